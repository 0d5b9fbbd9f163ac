"""Evaluation: the perplexity protocol, jitted scoring and lm-eval (its text and token windows come
from `nnxprune.data`)."""
