"""Stratus shared layer: the contracts and helpers every function and worker imports."""
