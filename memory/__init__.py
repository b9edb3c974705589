"""Vector memory: the SQLite store, the embedder and the FAISS index."""
