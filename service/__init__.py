"""Refit's application layer: the CLI now; the Ray Serve app and HTTP API build on it."""
