"""Measuring a model: perplexity on held-out data."""
