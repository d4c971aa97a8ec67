"""recipes blocks."""
