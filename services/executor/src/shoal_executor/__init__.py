"""Shoal executor service."""
