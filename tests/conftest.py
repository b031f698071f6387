"""Session fixtures: a real NATS server, a real OCI registry, and real Shoal processes."""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
from shoal_common.bus import Bus
from shoal_common.config import Config, load_config
from support.nats import nats_server
from support.processes import Node, ServiceSet
from support.registry import Registry

# A suite started in the background by a non-interactive shell (`.ci/run &`) inherits SIGINT
# ignored, and so would every program it starts: the docker CLI and `shoal up` would then
# not stop at the Ctrl-C the tests send. A handler (unlike an ignore) is reset by exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_node_ids = itertools.count()


@pytest.fixture
def root() -> None:
    """For tests that need root (mounts, chown, mknod, chroot): they fail without it, never
    skip, so a CI run (as root) can never pass by skipping them."""
    if os.geteuid() != 0:
        pytest.fail("these tests need root (CI runs as root)", pytrace=False)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nats_server(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture
def node(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Node:
    """A fresh node id per test: subjects are node-scoped, so tests never see each other."""
    # The pid keeps concurrent test runs on one machine (one NATS each) apart in logs and
    # in anything named after the node.
    return Node(f"t{os.getpid()}-{next(_node_ids)}", nats_url,
                tmp_path_factory.mktemp("node"))


@pytest.fixture
def services(node: Node) -> Iterator[ServiceSet]:
    """Starts nothing by itself; stops whatever the test started."""
    procs = ServiceSet(node)
    yield procs
    procs.stop_all()


def node_config(node: Node) -> Config:
    return load_config(env={}, flags={
        "node_id": node.node_id, "nats.url": node.nats_url,
        "state_root": str(node.state_root), "run_root": str(node.run_root)})


@pytest.fixture
async def bus(node: Node) -> AsyncIterator[Bus]:
    """A client connection for the test, on the test's node."""
    client = Bus(node_config(node), service="test", replica="test")
    await client.connect(wait=10)
    yield client
    await client.close()


