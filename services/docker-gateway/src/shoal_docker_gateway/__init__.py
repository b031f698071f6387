"""Shoal's Docker gateway: the Docker Engine API (1.41) on `<run_root>/docker.sock`."""
