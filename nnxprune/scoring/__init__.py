"""Importance scores: which channels, heads, neurons, layers or weights matter least."""
