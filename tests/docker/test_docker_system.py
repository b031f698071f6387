"""The Docker gateway's first endpoints, through Debian's docker CLI and the docker SDK:
version negotiation, `docker version`/`info`, the socket's mode, and Docker's errors."""

from __future__ import annotations

import json
import stat
import subprocess

from support.docker import docker_node_fixture
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("system")


def test_version_negotiated_and_socket_owner_only(dnode) -> None:
    assert stat.S_IMODE(dnode.socket.stat().st_mode) == 0o600
    out = json.loads(dnode.out("version", "--format", "{{json .}}"))
    assert out["Server"]["ApiVersion"] == "1.41"
    assert out["Server"]["Platform"]["Name"] == "Shoal"
    assert out["Client"]["ApiVersion"] == "1.41"


def test_info_counts(dnode) -> None:
    info = json.loads(dnode.out("info", "--format", "{{json .}}"))
    assert info["OSType"] == "linux"
    assert info["Containers"] >= 0 and info["Swarm"]["LocalNodeState"] == "inactive"


def test_sdk_ping_and_version(dnode) -> None:
    client = dnode.sdk()
    assert client.ping() is True
    assert client.version()["ApiVersion"] == "1.41"


def test_unsupported_endpoint_is_501_naming_it(dnode) -> None:
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(dnode.socket),
                          "http://docker/v1.41/swarm/init", "-X", "POST"],
                         capture_output=True, text=True, check=True).stdout
    body, code = out.rsplit("\n", 1)
    assert code == "501"
    assert json.loads(body) == {"message": "not implemented by Shoal: POST /v1.41/swarm/init"}
