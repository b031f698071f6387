"""Streaming URL tokens: single use, expiring, bounded; and the pieces of the remote command
protocol that need no container (status bodies, resize parsing, negotiation)."""

from __future__ import annotations

import asyncio
import json

import pytest
from shoal_common.errors import Unavailable
from shoal_cri_gateway.domain.streams import TerminalSize
from shoal_cri_gateway.streaming import remotecommand, tokens
from shoal_cri_gateway.streaming.tokens import TokenCache


def test_tokens_are_single_use_per_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    cache: TokenCache[str] = TokenCache()
    token = cache.insert("exec", "request")
    assert len(token) >= 20 and token != cache.insert("exec", "other")
    assert cache.consume("attach", token) is None  # another kind's URL
    assert cache.consume("exec", token) == "request"
    assert cache.consume("exec", token) is None


def test_tokens_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(tokens.time, "monotonic", lambda: now[0])
    cache: TokenCache[str] = TokenCache(ttl=60)
    early, late = cache.insert("exec", "a"), None
    now[0] += 30
    late = cache.insert("exec", "b")
    now[0] += 31  # the first is 61 s old, the second 31 s
    assert cache.consume("exec", early) is None
    assert cache.consume("exec", late) == "b"
    assert len(cache) == 0


def test_tokens_in_flight_are_bounded() -> None:
    cache: TokenCache[int] = TokenCache(max_in_flight=2)
    cache.insert("exec", 1)
    cache.insert("exec", 2)
    with pytest.raises(Unavailable, match="too many"):
        cache.insert("exec", 3)


def test_status_bodies() -> None:
    assert remotecommand.status_bytes(remotecommand.success(), remotecommand.V4) == \
        b'{"metadata":{},"status":"Success"}'
    failed = remotecommand.exit_failure(7, ["sh", "-c", "exit 7"])
    body = json.loads(remotecommand.status_bytes(failed, remotecommand.V4))
    assert body["reason"] == "NonZeroExitCode"
    assert body["details"] == {"causes": [{"reason": "ExitCode", "message": "7"}]}
    # Before v4: only a failure's message, success says nothing.
    assert remotecommand.status_bytes(remotecommand.success(), remotecommand.V2) == b""
    assert b"exit code 7" in remotecommand.status_bytes(failed, remotecommand.V1)
    internal = remotecommand.internal_error("boom")
    assert (internal["code"], internal["reason"]) == (500, "InternalError")


async def test_resize_stream_of_json_in_any_pieces() -> None:
    queue: asyncio.Queue[TerminalSize] = asyncio.Queue()
    decoder = remotecommand.ResizeDecoder(queue)
    for piece in (b'{"Width":80,', b'"Height":24}\n{"Width"', b':100,"Height":30}',
                  b'{"Width":0,"Height":0}', b'{"Width":"x"}{"Width":1,"Height":2}'):
        decoder.feed(piece)
    got = [queue.get_nowait() for _ in range(queue.qsize())]
    assert got == [TerminalSize(80, 24), TerminalSize(100, 30), TerminalSize(1, 2)]
