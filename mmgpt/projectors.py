"""Projectors: encoder features to decoder width."""
