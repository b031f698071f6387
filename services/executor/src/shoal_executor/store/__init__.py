"""Storage of the executor: sandboxes and containers it set up (SQLite), bundles on disk."""
