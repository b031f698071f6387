"""Shoal puller service."""
