"""Pure jax.numpy / NumPy math for pruning: mask selection, and (later) SparseGPT and SparseLLM."""
