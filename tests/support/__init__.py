"""Shared test support: OCI image building and a real local registry.

`tests/` has no `__init__.py`, so pytest puts `tests/` on sys.path and this package
imports as `support` (e.g. `from support.images import busybox_image`).
"""
