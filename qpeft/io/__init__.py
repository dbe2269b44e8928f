"""Checkpoint I/O: atomic directories, qpeft checkpoints."""
