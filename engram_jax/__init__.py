"""engram_jax: a hybrid MoE + Engram (hashed n-gram memory) language model in JAX / Flax NNX.

Implements the model of "Conditional Memory via Scalable Lookup" (DeepSeek-AI, arXiv 2601.07372):
a Transformer backbone with DeepSeekMoE-style routed + shared experts and Engram modules at chosen
layers, plus exact parameter/FLOP accounting and the sparsity-allocation solver.

Axis letters used in local names (``x_BxTxD``) and docstrings:
  B batch, T time (sequence), D model width, V vocabulary, N attention heads, Dh head width,
  F feed-forward hidden width, E routed experts, K top-k, C expert capacity (slots per expert),
  G hash heads of one Engram layer ((max_ngram - 1) * heads_per_ngram), M Engram memory width
  (G * d_head), R rows of a flat Engram table, W conv kernel.

This package imports no Ray and sets no global JAX flags.
"""

__version__ = "0.1.0"
