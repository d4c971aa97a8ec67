"""tokenizers blocks."""
