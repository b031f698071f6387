"""Constrained field types for bus messages: declared once here, checked by msgspec while
a body is decoded, so a handler never sees a field that could escape its roots, and a bad
one is answered `invalid` naming the field (`Expected str matching regex ... - at $.id`).

`\\Z`, not `$`: `$` also matches before a trailing newline."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

# Names files, directories, runc state, cgroups and network namespaces: no separator, no
# leading dot or dash (no "..", no option look-alikes), bounded.
ObjectId = Annotated[str, Meta(pattern=r"\A[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,127}\Z")]
# An id that may be absent ("" = none).
OptionalId = Annotated[str, Meta(pattern=r"\A(|[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,127})\Z")]
ExecId = Annotated[str, Meta(pattern=r"\A[A-Za-z0-9_-]{1,64}\Z")]
# A CRI runtime handler name (mapped to a binary by the receiver's own configuration).
HandlerName = Annotated[str, Meta(pattern=r"\A(|[A-Za-z0-9][A-Za-z0-9_.-]{0,62})\Z")]
# Printable, no control characters (snapshot keys, image names and references, labels).
Printable = Annotated[str, Meta(pattern=r"\A[^\x00-\x1f\x7f]{0,4096}\Z")]
Digest = Annotated[str, Meta(pattern=r"\Asha256:[a-f0-9]{64}\Z")]
OptionalDigest = Annotated[str, Meta(pattern=r"\A(|sha256:[a-f0-9]{64})\Z")]
# An absolute path without "." or ".." components or control characters; where it must
# lie is the receiver's check (its own roots), after resolving symlinks.
AbsPath = Annotated[str, Meta(
    pattern=r"\A(?!.*/\.{1,2}(/|\Z))/[^\x00-\x1f\x7f]{0,4095}\Z")]
OptionalAbsPath = Annotated[str, Meta(
    pattern=r"\A(|(?!.*/\.{1,2}(/|\Z))/[^\x00-\x1f\x7f]{0,4095})\Z")]
# Sizes, offsets, timeouts and signals are bounded so no arithmetic or allocation explodes.
Size = Annotated[int, Meta(ge=0, le=1 << 50)]
Seconds = Annotated[float, Meta(ge=0, le=366 * 24 * 3600)]
Signal = Annotated[int, Meta(ge=0, le=64)]
# Snapshot keys are database keys, never paths (snapshot directories are numbered).
SnapshotKey = Annotated[str, Meta(pattern=r"\A[^\x00-\x1f\x7f]{1,1024}\Z")]
# An image reference as a client wrote it (parsed and checked by the puller); bounded so
# no message about it overflows anything.
ImageRef = Annotated[str, Meta(pattern=r"\A[^\x00-\x1f\x7f]{0,4096}\Z")]
