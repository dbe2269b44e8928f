"""Decomposition methods: W ≈ Q + (a trainable high-precision part)."""
