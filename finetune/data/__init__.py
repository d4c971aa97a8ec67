"""data blocks."""
