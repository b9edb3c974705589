"""Vector memory: the SQLite store, the embedder and the FAISS index."""

import config  # noqa: F401 - sets the OpenMP wait policy before FAISS or torch is loaded
