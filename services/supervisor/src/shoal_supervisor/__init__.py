"""Shoal supervisor service."""
