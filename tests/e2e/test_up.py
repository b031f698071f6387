"""`shoal up` as a user runs it: embedded NATS, every service, restarts, clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from shoal_common.catalog import SERVICES
from support.ports import free_port
from support.processes import (
    EVERY_SERVICE_AT_START,
    SHOAL,
    metrics_sets,
    pids_mentioning,
    shoal_up_argv,
)

pytestmark = pytest.mark.e2e


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def metrics_of(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def status(flags: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SHOAL, "status", *flags], capture_output=True, text=True, timeout=30)


def status_rows(out: str) -> dict[str, tuple[str, int]]:
    """replica -> (status, pid) from `shoal status` output."""
    rows = {}
    for line in out.splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 4 and parts[2] != "DOWN" and parts[0] != "SERVICE":
            rows[parts[1]] = (parts[2], int(parts[3]))
    return rows


def test_up_serves_restarts_and_stops_cleanly(tmp_path: Path) -> None:
    nats_port = free_port()
    common = ["--node-id", "upnode", "--state-root", str(tmp_path / "state"),
              "--run-root", str(tmp_path / "run")]
    sets = [f"nats.embedded.listen=127.0.0.1:{nats_port}", "log.format=json",
            "launcher.restart_backoff_initial=0.2", *metrics_sets(), EVERY_SERVICE_AT_START]
    argv = shoal_up_argv(tmp_path, "upnode", sets, "--replicas", "puller=2")
    out_path, err_path = tmp_path / "up.out", tmp_path / "up.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        up = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "Press Ctrl-C" in out_path.read_text() or up.poll() is not None,
                 60, "shoal up to report ready")
        assert up.poll() is None, err_path.read_text()[-3000:]
        summary = out_path.read_text()
        assert f"unix://{tmp_path}/run/cri.sock" in summary
        assert (tmp_path / "run" / "cri.sock").is_socket()
        assert (tmp_path / "run" / "cri.sock").stat().st_mode & 0o777 == 0o600
        urls = re.findall(r"http://[\d.:]+/metrics", summary)
        assert len(urls) == 1 + len(SERVICES) + 1  # launcher, each service, 2nd puller
        for url in urls:
            assert metrics_of(url)
        # Prometheus file-SD targets name the addresses really bound (port 0 configured).
        groups = json.loads((tmp_path / "run" / "prometheus-targets.json").read_text())
        targets = {t for g in groups for t in g["targets"]}
        assert {u.removeprefix("http://").removesuffix("/metrics") for u in urls} == targets

        client = [*common, "--nats-url", f"nats://127.0.0.1:{nats_port}"]
        result = status(client)
        assert result.returncode == 0, result.stdout + result.stderr
        rows = status_rows(result.stdout)
        expected = {f"{s.name}-0" for s in SERVICES} | {"puller-1"}
        assert expected <= rows.keys(), result.stdout
        assert all(state == "serving" for state, _ in rows.values())

        # kill -9 one service: the launcher restarts it, logs and counts the restart.
        old_pid = rows["executor-0"][1]
        subprocess.run(["kill", "-9", str(old_pid)], check=True)

        def restarted() -> bool:
            new = status_rows(status(client).stdout).get("executor-0")
            return new is not None and new[1] != old_pid

        wait_for(restarted, 30, "executor-0 to come back with a new pid")
        assert "child exited; restarting" in err_path.read_text()
        launcher_url = urls[0]
        assert metrics_of(launcher_url)["shoal_service_restarts_total{service=executor}"] == 1
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)  # what Ctrl-C does
        code = up.wait(timeout=60)
    assert code == 0, err_path.read_text()[-3000:]
    assert pids_mentioning(str(tmp_path)) == []
    assert not (tmp_path / "run" / "cri.sock").exists()
    assert not (tmp_path / "run" / "prometheus-targets.json").exists()


def docker_ping(sock: Path, timeout: float = 30) -> str:
    """GET /_ping on the Docker socket, as the docker CLI's first request."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    with conn:
        conn.connect(str(sock))
        conn.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data.decode(errors="replace")


def gateway_pids(root: Path) -> list[int]:
    return [pid for pid in pids_mentioning(str(root))
            if "shoal_docker_gateway" in Path(f"/proc/{pid}/cmdline").read_text()]


def test_the_docker_gateway_starts_at_its_first_connection(tmp_path: Path) -> None:
    """Default settings: the launcher holds docker.sock, and the gateway starts when a client
    first connects; a gateway killed with a client waiting serves that client once it is
    back; a node whose gateway has state starts it with the others."""
    nats_port = free_port()
    client = ["--node-id", "ondemand", "--state-root", str(tmp_path / "state"),
              "--run-root", str(tmp_path / "run"), "--nats-url", f"nats://127.0.0.1:{nats_port}"]
    argv = shoal_up_argv(tmp_path, "ondemand", [f"nats.embedded.listen=127.0.0.1:{nats_port}",
                                                "log.format=json", *metrics_sets()])
    sock = tmp_path / "run" / "docker.sock"
    out_path, err_path = tmp_path / "up.out", tmp_path / "up.err"

    def start() -> subprocess.Popen[bytes]:
        with open(out_path, "wb") as out, open(err_path, "ab") as err:
            up = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        wait_for(lambda: "Press Ctrl-C" in out_path.read_text() or up.poll() is not None,
                 60, "shoal up to report ready")
        assert up.poll() is None, err_path.read_text()[-3000:]
        return up

    def stop(up: subprocess.Popen[bytes]) -> None:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0, err_path.read_text()[-3000:]

    up = start()
    try:
        assert re.search(r"docker-gateway-0\s+-\s+starts at the first connection",
                         out_path.read_text())
        assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o600
        assert gateway_pids(tmp_path) == []
        result = status(client)
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"^docker-gateway\s+-\s+ON-DEMAND", result.stdout, re.M), result.stdout

        reply = docker_ping(sock)
        assert reply.startswith("HTTP/1.1 200") and reply.endswith("OK"), reply
        first = gateway_pids(tmp_path)
        assert len(first) == 1
        rows = wait_for(lambda: (r := status_rows(status(client).stdout)).get(
            "docker-gateway-0") and r, 30, "the gateway in shoal status")
        assert rows["docker-gateway-0"] == ("serving", first[0])
        # The launcher rewrites its targets once its own health poll saw the gateway serve.
        wait_for(lambda: next(g["targets"] for g in json.loads(
            (tmp_path / "run" / "prometheus-targets.json").read_text())
            if g["labels"]["service"] == "docker-gateway"), 30, "the gateway's metrics target")

        # Killed: a client connecting right after waits in the launcher's socket, not refused.
        os.kill(first[0], signal.SIGKILL)
        reply = docker_ping(sock)
        assert reply.startswith("HTTP/1.1 200"), reply
        assert gateway_pids(tmp_path) not in ([], first)
    finally:
        stop(up)
    assert not sock.exists()
    assert pids_mentioning(str(tmp_path)) == []

    up = start()  # the gateway has records now: it starts with the others
    try:
        assert not re.search(r"docker-gateway-0\s+-\s", out_path.read_text())
        assert len(gateway_pids(tmp_path)) == 1
        assert docker_ping(sock).startswith("HTTP/1.1 200")
    finally:
        stop(up)
    assert pids_mentioning(str(tmp_path)) == []


def test_up_refuses_invalid_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "shoal.toml"
    config.write_text('[nats]\nrequest_timeout = "soon"\n')
    result = subprocess.run([SHOAL, "up", "--config", str(config)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0
    assert "nats.request_timeout" in result.stderr


def test_status_reports_down_services(tmp_path: Path, nats_url: str) -> None:
    result = status(["--node-id", "nobody-here", "--nats-url", nats_url, "--wait", "0.3"])
    assert result.returncode == 1
    assert result.stdout.count("DOWN") == len(SERVICES)


def test_up_with_external_nats_starts_no_server(tmp_path: Path, nats_url: str) -> None:
    argv = shoal_up_argv(tmp_path, "extnode", metrics_sets(), "--nats-url", nats_url)
    out_path = tmp_path / "up.out"
    with open(out_path, "wb") as out:
        up = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "Press Ctrl-C" in out_path.read_text() or up.poll() is not None,
                 60, "shoal up to report ready")
        assert f"{nats_url} (external)" in out_path.read_text()
        assert not (tmp_path / "state" / "nats").exists()
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    assert pids_mentioning(str(tmp_path)) == []
