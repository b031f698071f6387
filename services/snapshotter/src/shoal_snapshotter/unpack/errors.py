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


class LowerLayerNeeded(UnsafeLayerError):
    """OVERLAY mode only: an entry cannot be applied to the layer's own upper directory on
    its own, because its effect depends on the files of the layers below (a hardlink whose
    target is not in this layer, an opaque marker on the root, which overlayfs ignores, a
    path through a lower layer's symlink, which is followed).
    Not necessarily a fault of the layer: apply it again onto the merged tree of its
    parents, which decides. A subclass of UnsafeLayerError so that a caller that does not
    do that refuses the layer, as it would refuse a hardlink to something that is not there.
    """

    def __init__(self, entry: str, reason: str) -> None:
        Exception.__init__(self, f"layer entry {entry!r} needs the lower layers: {reason}")
        self.entry = entry
        self.reason = reason
