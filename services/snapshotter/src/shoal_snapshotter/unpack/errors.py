"""Errors raised while applying a layer."""

from __future__ import annotations


class UnsafeLayerError(Exception):
    """A layer entry would reach outside the snapshot root (or is otherwise refused)."""

    def __init__(self, entry: str, reason: str) -> None:
        super().__init__(f"unsafe layer entry {entry!r}: {reason}")
        self.entry = entry
        self.reason = reason

    def __reduce__(self) -> tuple[type[UnsafeLayerError], tuple[str, str]]:
        # The default reduce would call __init__ with the formatted message only.
        return (type(self), (self.entry, self.reason))


class LayerFormatError(Exception):
    """The layer is not a readable (optionally compressed) tar stream."""
