"""Snapshotter storage: snapshot metadata and image references in SQLite."""
