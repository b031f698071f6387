"""Shoal snapshotter service."""
