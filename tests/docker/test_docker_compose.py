"""docker-compose (Debian's 1.29) on the gateway: a project of two services on its default
network (`<project>_default`), a named volume and a published port: `up -d`, `ps`, `logs`,
`down -v`. The client service reaches the web service by its service name."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from support.docker import docker_node_fixture
from support.ports import free_port
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("compose")

COMPOSE = """\
version: "3.8"
services:
  web:
    image: {image}
    command: ["sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html &&
              exec busybox httpd -f -p 80 -h /www"]
    ports: ["{port}:80"]
  client:
    image: {image}
    depends_on: [web]
    volumes: ["shared:/data"]
    command: ["sh", "-c", "until wget -q -O /data/got http://web/; do sleep 0.3; done;
              echo client got $$(cat /data/got); exec sleep 300"]
volumes:
  shared: {{}}
"""


def _wait(what: str, check, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.3)


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.read()
    except OSError:
        return b""


def test_compose_up_ps_logs_down(dnode, images, tmp_path: Path) -> None:
    project = tmp_path / "shoalproj"
    project.mkdir()
    port = free_port()
    (project / "docker-compose.yml").write_text(COMPOSE.format(image=images["busybox"],
                                                               port=port))
    try:
        dnode.compose(project, "up", "-d")
        nets = dnode.out("network", "ls", "--format", "{{.Name}}").split()
        assert "shoalproj_default" in nets, nets
        assert "shoalproj_shared" in dnode.out("volume", "ls", "--format", "{{.Name}}")
        ps = dnode.compose(project, "ps").stdout.decode()
        assert "shoalproj_web_1" in ps and "shoalproj_client_1" in ps, ps
        assert ps.count(" Up ") == 2, ps
        assert f"0.0.0.0:{port}->80/tcp" in ps, ps

        def client_log() -> str:
            return dnode.compose(project, "logs", "--no-color", "client").stdout.decode()

        _wait("the client to reach web by name", lambda: "client got hello-from-web" in
              client_log())
        doc = json.loads(dnode.out("inspect", "shoalproj_web_1"))[0]
        ep = doc["NetworkSettings"]["Networks"]["shoalproj_default"]
        assert "web" in ep["Aliases"] and doc["Id"][:12] in ep["Aliases"], ep
        # compose exec (-T: no terminal here), by service name, resolving the other one.
        out = dnode.compose(project, "exec", "-T", "client", "sh", "-c",
                            "wget -qO- http://web/; nslookup web >/dev/null && echo found")
        assert out.stdout == b"hello-from-web\nfound\n", out
        # The published port, from the host.
        _wait("the published port", lambda: _get(f"http://127.0.0.1:{port}/") ==
              b"hello-from-web\n")
    finally:
        down = dnode.compose(project, "down", "-v", "-t", "1", check=False)
    assert down.returncode == 0, down
    assert "shoalproj_default" not in dnode.out("network", "ls", "--format", "{{.Name}}")
    assert "shoalproj_shared" not in dnode.out("volume", "ls", "--format", "{{.Name}}")
    assert dnode.out("ps", "-aq") == ""


TWO_NETWORKS = """\
version: "3.8"
services:
  api:
    image: {image}
    command: ["sh", "-c", "mkdir -p /www && echo hello-from-api > /www/index.html &&
              exec busybox httpd -f -p 80 -h /www"]
    networks: [front, back]
  db:
    image: {image}
    command: ["sleep", "300"]
    networks: [back]
  edge:
    image: {image}
    command: ["sleep", "300"]
    networks: [front]
networks:
  front: {{}}
  back: {{}}
"""


def test_compose_service_on_two_networks(dnode, images, tmp_path: Path) -> None:
    project = tmp_path / "twonets"
    project.mkdir()
    (project / "docker-compose.yml").write_text(TWO_NETWORKS.format(image=images["busybox"]))
    try:
        dnode.compose(project, "up", "-d")
        doc = json.loads(dnode.out("inspect", "twonets_api_1"))[0]
        nets = doc["NetworkSettings"]["Networks"]
        assert sorted(nets) == ["twonets_back", "twonets_front"], nets
        assert all(ep["IPAddress"] and "api" in ep["Aliases"] for ep in nets.values()), nets
        # api is reached by name from either network; db and edge share none.
        for client in ("db", "edge"):
            out = dnode.compose(project, "exec", "-T", client, "wget", "-qO-", "http://api/")
            assert out.stdout == b"hello-from-api\n", (client, out)
        out = dnode.compose(project, "exec", "-T", "api", "sh", "-c",
                            "nslookup db >/dev/null && nslookup edge >/dev/null && echo both")
        assert out.stdout == b"both\n", out
    finally:
        down = dnode.compose(project, "down", "-t", "1", check=False)
    assert down.returncode == 0, down
    names = dnode.out("network", "ls", "--format", "{{.Name}}").split()
    assert "twonets_front" not in names and "twonets_back" not in names, names
