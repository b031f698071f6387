"""The gateway's records per Shoal namespace: a database written before namespaces keeps its
rows (all k8s.io), a pod's CRI identity is unique per namespace only, and lookups by id or
prefix see their namespace only."""

from __future__ import annotations

from pathlib import Path

import pytest
from shoal_common.errors import AlreadyExists, Invalid, NotFound
from shoal_cri_gateway.domain.namespaces import namespace_from
from shoal_cri_gateway.store.metadata import MIGRATIONS, ContainerRecord, PodRecord
from support.cri_store import old_database, opened, schema_version

POD = "ab" * 32
CTR = "cd" * 32


def pod(pod_id: str, ns: str, uid: str = "u") -> PodRecord:
    return PodRecord(id=pod_id, name="web", uid=uid, namespace="default", attempt=0,
                     state="ready", created_at_ns=1, config=b"", shoal_namespace=ns)


def ctr(ctr_id: str, pod_id: str, ns: str) -> ContainerRecord:
    return ContainerRecord(id=ctr_id, pod_id=pod_id, name="main", attempt=0, created_at_ns=2,
                           image="img", image_ref="ref", image_id="id", config=b"",
                           shoal_namespace=ns)


async def test_rows_from_before_namespaces_are_k8s_io(tmp_path: Path) -> None:
    path = tmp_path / "metadata.db"
    old_database(path, 3, (
        "INSERT INTO pods VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (POD, "web", "u", "default", 0, "ready", 1, b"cfg", '{"a":"b"}', "{}", "10.0.0.2",
         "[]", "/var/run/netns/x", "runc")), (
        "INSERT INTO containers(id, pod_id, name, attempt, created_at_ns, image, image_ref, "
        "image_id, config, labels, annotations, log_path, state) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (CTR, POD, "main", 0, 2, "img", "ref", "id", b"c", "{}", "{}", "/l", "creating")))

    async with opened(path) as meta:
        p = await meta.pod(POD[:6], "k8s.io")
        assert (p.shoal_namespace, p.ip, p.labels, p.netns_path) == (
            "k8s.io", "10.0.0.2", {"a": "b"}, "/var/run/netns/x")
        c = await meta.container(CTR, "k8s.io")
        assert (c.shoal_namespace, c.state, c.log_path) == ("k8s.io", "creating", "/l")
        with pytest.raises(NotFound, match="in namespace team-a"):
            await meta.pod(POD, "team-a")
        # The containers still reference their pods after the tables were copied.
        keys = await meta.db.run(lambda c: c.execute(
            "PRAGMA foreign_key_list(containers)").fetchall())
        assert [(k["table"], k["from"], k["to"]) for k in keys] == [("pods", "pod_id", "id")]
        assert await meta.db.run(lambda c: c.execute("PRAGMA foreign_key_check").fetchall()) \
            == []
    assert schema_version(path) == len(MIGRATIONS)


async def test_identities_and_ids_are_per_namespace(tmp_path: Path) -> None:
    async with opened(tmp_path / "metadata.db") as meta:
        other = "ac" * 32  # shares the prefix "a" with POD
        await meta.add_pod(pod(POD, "k8s.io"))
        await meta.add_pod(pod(other, "team-a"))  # the same CRI identity, another namespace
        with pytest.raises(AlreadyExists, match="in namespace team-a"):
            await meta.add_pod(pod("ad" * 32, "team-a"))
        await meta.add_container(ctr(CTR, POD, "k8s.io"))
        await meta.add_container(ctr("ce" * 32, other, "team-a"))

        assert (await meta.pod("a", "k8s.io")).id == POD  # unique in its namespace
        assert (await meta.pod("a", "team-a")).id == other
        named = await meta.pod_named("team-a", pod(other, "team-a"))
        assert named is not None and named.id == other
        assert await meta.pod_named("team-b", pod(other, "team-a")) is None
        with pytest.raises(NotFound):
            await meta.container(CTR, "team-a")
        assert [p.id for p in await meta.pods("team-a")] == [other]
        assert {p.id for p in await meta.pods(None)} == {POD, other}
        assert [c.id for c in await meta.containers("k8s.io")] == [CTR]
        assert [c.id for c in await meta.containers("team-a", POD)] == []
        assert len(await meta.containers(None)) == 2


def test_namespace_metadata_is_checked() -> None:
    assert namespace_from(None) == "k8s.io"
    assert namespace_from(b"team-a") == "team-a"
    assert namespace_from("a.b_c-d") == "a.b_c-d"
    for bad in ("", "a b", "_a", "a.", "x" * 77, "a\nb"):
        with pytest.raises(Invalid, match="shoal-namespace"):
            namespace_from(bad)
