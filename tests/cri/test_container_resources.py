"""ContainerStatus.resources: read from the OCI spec as containerd does, updates recorded
in the gateway's metadata, and a database of the first schema carried over."""

from __future__ import annotations

from pathlib import Path

from cri_api.v1 import api_pb2 as cri
from shoal_cri_gateway.domain import resources
from shoal_cri_gateway.store.metadata import MIGRATIONS, ContainerRecord, PodRecord
from support.cri_store import old_database, opened, schema_version

SPEC = {
    "process": {"oomScoreAdj": 0},
    "linux": {"resources": {
        "devices": [{"allow": False, "access": "rwm"}],
        "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"},
        "memory": {"limit": 64 << 20, "swap": 64 << 20},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20}],
        "unified": {"memory.high": "1000000"},
    }},
}


def test_spec_resources_field_by_field() -> None:
    assert resources.from_spec(SPEC) == cri.LinuxContainerResources(
        cpu_period=100000, cpu_quota=50000, cpu_shares=512, cpuset_cpus="0", cpuset_mems="0",
        memory_limit_in_bytes=64 << 20, memory_swap_limit_in_bytes=64 << 20,
        hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=4 << 20)],
        unified={"memory.high": "1000000"})
    # The OOM score the executor wrote (raised to its own floor) is the one reported.
    assert resources.from_spec({"process": {"oomScoreAdj": -5}}) == \
        cri.LinuxContainerResources(oom_score_adj=-5)
    assert resources.from_spec({}) == cri.LinuxContainerResources()


async def test_without_a_readable_spec_the_cri_config_stands_in(tmp_path: Path) -> None:
    given = cri.LinuxContainerResources(cpu_shares=2, memory_limit_in_bytes=1 << 30,
                                        oom_score_adj=-997)
    config = cri.ContainerConfig(linux=cri.LinuxContainerConfig(resources=given))
    assert await resources.base(config.SerializeToString(), "") == given
    assert await resources.base(config.SerializeToString(), str(tmp_path / "gone")) == given
    assert await resources.base(cri.ContainerConfig().SerializeToString(), "") == \
        cri.LinuxContainerResources()
    (tmp_path / "config.json").write_text('{"process": {"oomScoreAdj": 3}}')
    assert await resources.base(config.SerializeToString(), str(tmp_path)) == \
        cri.LinuxContainerResources(oom_score_adj=3)


def test_updates_change_only_what_they_set_and_shoal_applies() -> None:
    created = resources.from_spec(SPEC)
    first = resources.record_update(None, cri.LinuxContainerResources(
        cpu_quota=80000, memory_limit_in_bytes=128 << 20,
        # Not applied by the runtime update, so not reported either.
        oom_score_adj=900, hugepage_limits=[cri.HugepageLimit(page_size="1GB", limit=1)]))
    assert first is not None
    second = resources.record_update(first, cri.LinuxContainerResources(cpuset_cpus="0-1"))
    assert second is not None
    # Nothing new: nothing to write.
    assert resources.record_update(second, cri.LinuxContainerResources(cpuset_cpus="0-1")) \
        is None
    assert resources.record_update(second, cri.LinuxContainerResources(unified={"a": "b"})) \
        is None

    now = resources.current(created, second).linux
    expected = cri.LinuxContainerResources()
    expected.CopyFrom(created)
    expected.cpu_quota, expected.cpuset_cpus = 80000, "0-1"
    # swap was paired with the limit, and moves with it (the supervisor's update does)
    expected.memory_limit_in_bytes = expected.memory_swap_limit_in_bytes = 128 << 20
    assert now == expected
    assert resources.current(created, None).linux == created


async def test_first_schema_database_is_migrated(tmp_path: Path) -> None:
    """A database written before updated resources were recorded keeps its rows."""
    path = tmp_path / "metadata.db"
    config = cri.ContainerConfig(linux=cri.LinuxContainerConfig(
        resources=cri.LinuxContainerResources(cpu_shares=256)))
    old_database(path, 1, (
        "INSERT INTO pods VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        ("p1", "pod", "uid", "ns", 0, "ready", 1, b"", "{}", "{}", "", "[]", "", "")), (
        "INSERT INTO containers VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        ("c1", "p1", "ctr", 0, 2, "img", "ref", "id", config.SerializeToString(), "{}", "{}",
         "")))

    async with opened(path) as meta:
        old = await meta.container("c1", "k8s.io")
        assert old.updated_resources is None and old.config == config.SerializeToString()
        await meta.update_resources("c1", lambda stored: resources.record_update(
            stored, cri.LinuxContainerResources(cpu_shares=1024)))
        await meta.update_resources("gone", lambda stored: b"never called")
        updated = await meta.container("c1", "k8s.io")
        created = await resources.base(updated.config, "")
        assert resources.current(created, updated.updated_resources).linux == \
            cri.LinuxContainerResources(cpu_shares=1024)
        # New rows go in by column name, with the new column.
        await meta.add_pod(PodRecord(id="p2", name="pod2", uid="u2", namespace="ns",
                                     attempt=0, state="ready", created_at_ns=3, config=b""))
        await meta.add_container(ContainerRecord(
            id="c2", pod_id="p2", name="ctr", attempt=0, created_at_ns=4, image="img",
            image_ref="ref", image_id="id", config=b""))
        assert (await meta.container("c2", "k8s.io")).updated_resources is None
    assert schema_version(path) == len(MIGRATIONS) == 5

