"""Evaluation: GPTQ-style perplexity."""
