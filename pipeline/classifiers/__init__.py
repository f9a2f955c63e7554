"""Classifiers: networks mapping images in [0, 1] to logits (normalisation inside)."""
