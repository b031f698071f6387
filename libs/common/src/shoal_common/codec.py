"""MessagePack bodies with typed decoding (msgspec).

msgspec is used rather than plain `msgpack` + hand-written checks because it validates a
body against the declared type while decoding and names the offending field
(`Expected int, got str - at $.size`), which is exactly the `invalid` reply we owe callers.
"""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar

import msgspec

from shoal_common.errors import Invalid

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


def encode(message: Any) -> bytes:
    return _encoder.encode(message)


@cache
def _decoder(typ: type[Any]) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(typ)


def decode(body: bytes, typ: type[T]) -> T:
    """Decode `body` as `typ`; a body that does not fit raises `Invalid` saying why."""
    try:
        # Bare `type`: mypy wrongly finds type[T] not Hashable for @cache (mypy#11470).
        cls: type = typ
        return _decoder(cls).decode(body)
    except msgspec.ValidationError as exc:
        raise Invalid(f"{typ.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise Invalid(f"{typ.__name__}: body is not valid MessagePack ({exc})") from None
