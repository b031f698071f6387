"""The puller's and the snapshotter's bus edges against a compromised peer: every verb of
both gets garbage bodies, wrong types in each field, traversal paths, control characters,
huge strings and numbers. Each is answered (never `internal`, never silence), nothing
outside Shoal's roots changes, and neither service restarts."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from shoal_common import subjects
from shoal_common.clients import ImagesClient, SnapshotsClient
from support.hostile import GARBAGE, HUGE_NUMBERS, WRONG_TYPES, ask, snapshot_of
from support.processes import ServiceSet, pids_mentioning
from support.shoal import images_fixture, start_shoal  # noqa: F401

pytestmark = pytest.mark.e2e

# No request should reach the network: references and digests that resolve locally.
BASE_STRINGS = {"ref": "sha256:" + "0" * 64, "digest": "sha256:" + "0" * 64,
                "image": "hostile/image:1", "pull_id": "hostile"}


def base_value(name: str, typ: Any) -> Any:
    """A well-typed value for a field of type `typ`."""
    origin = typing.get_origin(typ)
    if origin is typing.Annotated:
        return base_value(name, typing.get_args(typ)[0])
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        return base_body(typ)
    if typ is str:
        return BASE_STRINGS.get(name, "hostile")
    if typ is bool:
        return False
    if typ in (int, float):
        return 1
    if typ is bytes:
        return b""
    if origin in (list, tuple):
        return []
    if origin is dict:
        return {}
    if origin in (typing.Union, __import__("types").UnionType):
        return None
    return None


def base_body(typ: type[msgspec.Struct]) -> dict[str, Any]:
    hints = typing.get_type_hints(typ, include_extras=True)
    return {f.name: base_value(f.name, hints[f.name]) for f in msgspec.structs.fields(typ)}


def hostile_strings(sentinel: Path) -> list[str]:
    return [f"../../../../../../{sentinel}/x", str(sentinel), "/etc/passwd", "\x00", "a\nb",
            "\x1b]0;pwned\x07", "%", "*", "-rf", "x" * 300_000]


def bodies(typ: type[msgspec.Struct], sentinel: Path) -> list[bytes]:
    out = list(GARBAGE)
    base = base_body(typ)
    for name, value in base.items():
        hostile: list[Any] = list(WRONG_TYPES)
        if isinstance(value, str):
            hostile += hostile_strings(sentinel)
        elif isinstance(value, int):
            hostile += HUGE_NUMBERS
        elif isinstance(value, list):
            hostile += [["x"] * 10_000, [{"bad": 1}]]
        for bad in hostile:
            out.append(msgspec.msgpack.encode({**base, name: bad}))
    return out


async def test_every_puller_and_snapshotter_verb_refuses_a_hostile_peer(
        services: ServiceSet, images: dict[str, str], tmp_path: Path) -> None:
    procs = await start_shoal(services, images)
    sentinel = tmp_path / "sentinel"
    (sentinel / "dir").mkdir(parents=True)
    (sentinel / "dir" / "file").write_text("keep me")
    before = snapshot_of(sentinel)
    pids_before = set(pids_mentioning(str(services.node.root)))
    node = services.node.node_id
    bad: list[str] = []
    answers: dict[str, int] = {}
    nc = await nats.connect(services.node.nats_url)
    try:
        for client in (ImagesClient, SnapshotsClient):
            for verb in client.verbs().values():
                subject = subjects.command(node, client.service, verb.name)
                for body in bodies(verb.request, sentinel):
                    status, message = await ask(nc, subject, body)
                    answers[status] = answers.get(status, 0) + 1
                    if status in ("internal", "no reply"):
                        bad.append(f"{client.service}.{verb.name} {body[:60]!r}: {status} "
                                   f"{message[:200]}")
    finally:
        await nc.close()
    assert bad == [], "\n".join(bad)
    print(answers)
    assert sum(answers.values()) > 400 and answers.get("invalid", 0) > 300, answers
    assert snapshot_of(sentinel) == before
    assert not (sentinel / "x").exists()
    for name in ("puller", "snapshotter"):
        assert procs[name].proc.poll() is None, f"{name} exited"
        assert '"serving"' in procs[name].log_text()
        assert procs[name].log_text().count('"serving"') == 1, f"{name} restarted"
    assert set(pids_mentioning(str(services.node.root))) <= pids_before
