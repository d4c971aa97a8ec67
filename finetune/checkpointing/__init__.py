"""checkpointing blocks."""
