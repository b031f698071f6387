"""Snapshotter domain: snapshots, drivers, layer unpack, image references."""
