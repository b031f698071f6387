"""Codec, subjects and error mapping."""

from __future__ import annotations

import grpc
import msgspec
import pytest
from shoal_common import codec, subjects
from shoal_common.errors import GRPC_STATUS, ErrorCode, Invalid, NotFound, ShoalError
from shoal_common.messages import HealthReply, PingRequest


def test_round_trip() -> None:
    msg = PingRequest(payload=b"abc", delay_ms=5)
    assert codec.decode(codec.encode(msg), PingRequest) == msg


@pytest.mark.parametrize(("body", "why"), [
    (b"\xc1", "not valid MessagePack"),
    (msgspec.msgpack.encode({"delay_ms": "soon"}), "$.delay_ms"),
    (msgspec.msgpack.encode({"delay_ms": 999_999}), "$.delay_ms"),
    (msgspec.msgpack.encode([1, 2]), "Expected `object`"),
])
def test_bad_bodies_are_invalid_with_reason(body: bytes, why: str) -> None:
    with pytest.raises(Invalid) as info:
        codec.decode(body, PingRequest)
    assert why in info.value.message
    assert info.value.code == ErrorCode.INVALID


def test_missing_required_field_is_named() -> None:
    with pytest.raises(Invalid, match="missing required field `service`"):
        codec.decode(msgspec.msgpack.encode({}), HealthReply)


def test_every_code_maps_to_a_grpc_status() -> None:
    for code in ErrorCode:
        assert isinstance(grpc.StatusCode[GRPC_STATUS[code]], grpc.StatusCode)
    assert GRPC_STATUS[ErrorCode.INVALID] == "INVALID_ARGUMENT"


def test_error_rebuilt_from_code() -> None:
    err = ShoalError.from_code("not_found", "no such image")
    assert isinstance(err, NotFound) and err.message == "no such image"
    assert ShoalError.from_code("weird", "x").code == ErrorCode.INTERNAL


def test_event_subject_escapes_dotted_namespace() -> None:
    subject = subjects.event("n1", "k8s.io", "images.create")
    assert subject == "shoal.v1.n1.events.k8s%2Eio.images.create"
    assert subjects.parse_event(subject) == ("n1", "k8s.io", "images.create")


def test_every_message_module_declares_valid_types() -> None:
    import importlib
    import pkgutil

    import shoal_common.messages as pkg
    from shoal_common.messages import Event, Message

    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"shoal_common.messages.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Message | Event):
                msgspec.msgpack.Decoder(value)  # builds the type's decoder
            if isinstance(value, type) and issubclass(value, Event) and value is not Event:
                assert value.TOPIC, f"{value.__name__} has no TOPIC"
