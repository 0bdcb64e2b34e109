"""reproduce.py: the paper's studies as declarative rows, resumable runs, and their tables."""
