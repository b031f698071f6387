"""Storage of the puller: the content store (blobs on disk) and image records (SQLite)."""
