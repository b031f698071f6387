"""Shoal cri gateway service."""
