"""Viewers of cryopick outputs."""
