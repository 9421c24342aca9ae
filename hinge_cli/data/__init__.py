"""Measured expression, gene panels and training tables."""
