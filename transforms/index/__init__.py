"""Indexing: the job's vectors read from Parquet (vectors), a FAISS index under a memory
budget with its report (build), filters on class fractions (filters) and search."""
