"""Images in and out of the puller's store as archives (`shoal image import/export`).

An import sends blobs, never the archive: the CLI reads and checks the tar, then
`import.begin` names every blob the images need (the puller leases them under the
caller-chosen import id and answers which it lacks), `import.write` sends each missing blob
in chunks keyed by offset (a resent chunk changes nothing; any replica may take any chunk),
and `import.commit` records the images once the puller has checked them whole.
`import.abort` throws away what an import wrote that no image uses. An export reads blobs
with `images.content.read`."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from shoal_common.messages.base import Message
from shoal_common.messages.fields import Digest, ImageRef, Printable, Size
from shoal_common.messages.images import ImageInfo

# Caller-chosen; names the import's lease, so a retried call finds the same import.
TransferId = Annotated[str, Meta(pattern=r"\A[A-Za-z0-9_-]{1,64}\Z")]
# Chunks stay well under NATS' 1 MiB payload, as content.read's replies do.
MAX_IMPORT_WRITE = 512 * 1024
MAX_IMPORT_BLOBS = 4096
MAX_IMPORT_IMAGES = 256
MAX_IMAGE_NAMES = 64


class ImportBlob(Message):
    digest: Digest
    size: Size


class ImportBeginRequest(Message):
    import_id: TransferId
    blobs: Annotated[list[ImportBlob], Meta(max_length=MAX_IMPORT_BLOBS)]


class ImportPending(Message):
    """A blob the store lacks; `offset` bytes of it are already held (an earlier write
    that stopped): send from there."""

    digest: str
    offset: int


class ImportBeginReply(Message):
    missing: list[ImportPending]


class ImportWriteRequest(Message):
    import_id: TransferId
    digest: Digest
    size: Size  # of the whole blob
    offset: Size  # where `data` starts in it
    data: Annotated[bytes, Meta(max_length=MAX_IMPORT_WRITE)]


class ImportWriteReply(Message):
    held: int  # bytes of the blob the store holds now
    committed: bool  # all of it, digest checked


class ImportImage(Message):
    digest: Digest  # what the image's names point at: a manifest or an index
    names: Annotated[list[ImageRef], Meta(min_length=1, max_length=MAX_IMAGE_NAMES)]
    # The archive descriptor's media type ("": the document's own).
    media_type: Printable = ""


class ImportCommitRequest(Message):
    import_id: TransferId
    images: Annotated[list[ImportImage], Meta(min_length=1, max_length=MAX_IMPORT_IMAGES)]


class ImportCommitReply(Message):
    images: list[ImageInfo]


class ImportAbortRequest(Message):
    import_id: TransferId


class ImportAbortReply(Message):
    deleted_blobs: list[str]
