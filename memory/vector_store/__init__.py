"""Embedding model and FAISS index, one index per model id."""
