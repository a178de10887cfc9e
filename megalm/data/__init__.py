"""Data: batches, the built-in synthetic token stream (the tokenizer and mmap datasets come later)."""
