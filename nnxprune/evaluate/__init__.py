"""Evaluation: the perplexity protocol, its data (WikiText-2, C4) and token windows."""
