"""training blocks."""
