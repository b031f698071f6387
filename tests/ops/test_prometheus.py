"""A real Prometheus (Debian's package) scrapes a real `shoal up` through
deploy/prometheus/prometheus.yml; a pull and a pod move the right series, and every query of
the Grafana dashboard deploy/grafana/shoal.json parses and returns data from it.

Prometheus and `shoal up` are started once for the module and the workload runs once."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from shoal_common.catalog import SERVICES
from support.images import busybox_image, pause_image, push
from support.ports import free_port
from support.processes import (
    EVERY_SERVICE_AT_START,
    metrics_sets,
    pids_mentioning,
    shoal_up_argv,
)
from support.registry import Registry

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "shoal.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
DEFAULT_TARGETS = "/run/shoal/prometheus-targets.json"  # what prometheus.yml points at
NODE = "promnode"
SUBNET, BRIDGE = "10.150.0.0/24", "shoalprom0"  # this module's pod network
SCRAPE_INTERVAL = "1s"
# Grafana's template variables as the dashboard test substitutes them (all nodes/services).
GRAFANA_VARS = {"__rate_interval": "30s", "node": ".*", "service": ".*"}
# Series the workload moves, summed over this module's node.
SERIES = {
    "pulls_ok": 'shoal_puller_pulls_total{outcome="ok"}',
    "pulls_not_found": 'shoal_puller_pulls_total{outcome="not_found"}',
    "layer_bytes": "shoal_puller_layer_bytes_fetched_total",
    "layers_unpacked": 'shoal_snapshotter_layers_unpacked_total{outcome="ok"}',
    "pod_starts": "shoal_cri_pod_start_seconds_count",
    "pod_start_seconds": "shoal_cri_pod_start_seconds_sum",
    "pods_ready": 'shoal_cri_pods{state="ready"}',
    "tasks_running": 'shoal_supervisor_tasks{state="running"}',
    "exits_error": 'shoal_supervisor_exits_total{reason="Error"}',
    "run_pod_ok": 'shoal_cri_requests_total{rpc="RunPodSandbox", code="OK"}',
    "pull_not_found": 'shoal_cri_requests_total{rpc="PullImage", code="NOT_FOUND"}',
    "bus_pull_errors": ('shoal_bus_requests_handled_total{service="puller", '
                        'subject="images.pull", outcome="not_found"}'),
}
# What the workload adds at least: busybox and pause pulled, one missing image, one pod whose
# pause and `sleep` run while a second container exits 3.
EXPECTED_INCREASE = {
    "pulls_ok": 2, "pulls_not_found": 1, "layer_bytes": 1, "layers_unpacked": 2,
    "pod_starts": 1, "pod_start_seconds": 1e-9, "pods_ready": 1, "tasks_running": 2,
    "exits_error": 1, "run_pod_ok": 1, "pull_not_found": 1, "bus_pull_errors": 1,
}

# Never route loopback requests through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PromError(AssertionError):
    """Prometheus refused a request (e.g. a query that does not parse)."""


def prom_get(base: str, path: str, params: list[tuple[str, str]] | None = None) -> Any:
    """GET a Prometheus API path; its `data`, or PromError with Prometheus' message."""
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with _OPENER.open(url, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error body
        raw = exc.read()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:  # e.g. 503 "Service Unavailable" while Prometheus starts
            raise PromError(f"HTTP {exc.code}: {raw[:200]!r}") from None
    if body.get("status") != "success":
        raise PromError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(base: str, expr: str) -> list[dict[str, Any]]:
    data = prom_get(base, "/api/v1/query", [("query", expr)])
    result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [
        {"metric": {}, "value": data["result"]}]
    return result


def on_node(selector: str) -> str:
    """The selector restricted to this module's node."""
    name, _, labels = selector.partition("{")
    matchers = labels.rstrip("}") or 'job="shoal"'
    return f'{name}{{node="{NODE}", {matchers}}}'


def total(base: str, selector: str) -> float:
    """Sum of a selector's current values on this node; 0 if it has no series yet
    (labelled counters appear at their first increment)."""
    return sum(float(r["value"][1]) for r in query(base, f"sum({on_node(selector)})"))


def scraped_at_least(base: str, selector: str, samples: int) -> bool:
    """Every series of the selector on this node has `samples` samples in the last 30 s."""
    counts = query(base, f"count_over_time({on_node(selector)}[30s])")
    return bool(counts) and all(float(r["value"][1]) >= samples for r in counts)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            if not value:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            return value
        time.sleep(0.2)


def prometheus_config(targets: Path) -> str:
    """deploy/prometheus/prometheus.yml with the test's targets file and scrape interval."""
    text = PROMETHEUS_YML.read_text()
    text, n_interval = re.subn(r"^(\s*scrape_interval:\s*)\S+", rf"\g<1>{SCRAPE_INTERVAL}",
                               text, flags=re.M)
    text, n_files = re.subn(rf"^(\s*-\s*){re.escape(DEFAULT_TARGETS)}\s*$", rf"\g<1>{targets}",
                            text, flags=re.M)
    assert (n_interval, n_files) == (1, 1), (
        f"{PROMETHEUS_YML} should have one global scrape_interval and list {DEFAULT_TARGETS} "
        "once under files:")
    return text


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [(inner["title"], t["expr"]) for t in inner.get("targets", [])]
    return found


def substitute(text: str) -> str:
    """Grafana's template variables replaced ($var and ${var}); nothing else may remain."""
    for name, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in text, f"unknown template variable in {text!r}"
    return text


@dataclass
class Stack:
    prom: str  # Prometheus' base URL
    summary: str  # what `shoal up` printed
    before: dict[str, float]
    after: dict[str, float] = field(default_factory=dict)


def _start_shoal(tmp: Path, pause: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    # Fixed free ports for the services, not 127.0.0.1:0: `shoal up` writes each service's
    # configured metrics address to the targets file, so a port 0 would be written as ":0".
    sets = [f"nats.embedded.listen=127.0.0.1:{free_port()}", "log.format=json",
            f'cri.sandbox_image="{pause}"', f'services.executor.pod_subnet="{SUBNET}"',
            f'services.executor.cni_bridge="{BRIDGE}"', *metrics_sets(free_port),
            EVERY_SERVICE_AT_START]
    argv = shoal_up_argv(tmp, NODE, sets)
    out_path, err_path = tmp / "up.out", tmp / "up.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        up = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    return up, out_path, err_path


def _stop(proc: subprocess.Popen[bytes], sig: int, what: str, log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{what} did not stop within 60 s") from None
    assert code == 0, f"{what} exited {code}:\n{log.read_text()[-3000:]}"


def _remove_pods(runtime: cri_grpc.RuntimeServiceStub) -> None:
    for pod in runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items:
        runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
        runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)


def _workload(channel: grpc.Channel, images: dict[str, str], logs: Path) -> str:
    """Pull busybox, fail to pull a missing image, run a pod: `sleep` plus a container that
    exits 3 (the pod's pause image is pulled by RunPodSandbox). Returns the pod id."""
    image_api = cri_grpc.ImageServiceStub(channel)
    runtime = cri_grpc.RuntimeServiceStub(channel)
    image_api.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=images["busybox"])),
                        timeout=120)
    with pytest.raises(grpc.RpcError) as missing:
        image_api.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=images["missing"])),
                            timeout=60)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND, missing.value
    logs.mkdir()
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="prom", uid=uuid.uuid4().hex, namespace="default"),
        hostname="prom", log_directory=str(logs))
    pod_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                   timeout=120).pod_sandbox_id
    for name, command in (("sleeper", ["sleep", "3600"]), ("quitter", ["sh", "-c", "exit 3"])):
        container = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name), command=command,
            image=cri.ImageSpec(image=images["busybox"]), log_path=f"{name}.log")
        cid = runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, sandbox_config=config, config=container),
            timeout=60).container_id
        runtime.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=60)
    return pod_id


@pytest.fixture(scope="module")
def stack(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not PROMETHEUS.is_file():
        pytest.fail(f"{PROMETHEUS} is missing: these tests need Debian's prometheus package "
                    "(deploy/setup.sh --test installs it; CI runs deploy/test.sh)",
                    pytrace=False)
    tmp = tmp_path_factory.mktemp("prom")
    push(registry.url, "prom/pause", "1", pause_image())
    push(registry.url, "prom/busybox", "1", busybox_image())
    images = {"pause": f"{registry.host}/prom/pause:1",
              "busybox": f"{registry.host}/prom/busybox:1",
              "missing": f"{registry.host}/prom/missing:1"}
    with contextlib.ExitStack() as cleanup:
        # Undone in reverse: pods, Prometheus, `shoal up`, the bridge.
        cleanup.callback(subprocess.run, ["ip", "link", "delete", BRIDGE], capture_output=True)
        up, out_path, err_path = _start_shoal(tmp, images["pause"])
        cleanup.callback(_stop, up, signal.SIGINT, "shoal up", err_path)
        wait_for(lambda: "Press Ctrl-C" in out_path.read_text() or up.poll() is not None, 90,
                 "shoal up to report ready")
        assert up.poll() is None, f"shoal up exited:\n{err_path.read_text()[-3000:]}"
        targets = tmp / "run" / "prometheus-targets.json"
        assert targets.is_file(), out_path.read_text()

        config = tmp / "prometheus.yml"
        config.write_text(prometheus_config(targets))
        if PROMTOOL.is_file():
            check = subprocess.run([str(PROMTOOL), "check", "config", str(config)],
                                   capture_output=True, text=True, timeout=30)
            assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        prom_log = tmp / "prometheus.log"
        with open(prom_log, "wb") as log:
            prom = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        cleanup.callback(_stop, prom, signal.SIGTERM, "prometheus", prom_log)
        base = f"http://127.0.0.1:{port}"

        def all_up() -> bool:
            assert prom.poll() is None, f"prometheus exited:\n{prom_log.read_text()[-3000:]}"
            try:
                active = prom_get(base, "/api/v1/targets")["activeTargets"]
            except (OSError, PromError):
                return False
            return len(active) == 1 + len(SERVICES) and all(t["health"] == "up"
                                                             for t in active)

        wait_for(all_up, 30, "Prometheus to scrape every target up")
        before = {key: total(base, sel) for key, sel in SERIES.items()}

        channel = grpc.insecure_channel(f"unix://{tmp}/run/cri.sock")
        cleanup.callback(channel.close)
        cleanup.callback(_remove_pods, cri_grpc.RuntimeServiceStub(channel))
        pod_id = _workload(channel, images, tmp / "logs")

        result = Stack(base, out_path.read_text(), before)

        def moved() -> bool:
            result.after = {key: total(base, sel) for key, sel in SERIES.items()}
            return all(result.after[k] - before[k] >= n for k, n in EXPECTED_INCREASE.items())

        # Let Prometheus scrape the outcome; the tests say what is missing, if anything.
        with contextlib.suppress(AssertionError):
            wait_for(moved, 20, "the workload's series")
            # rate()/increase() need two samples: let every series born in the workload
            # (labelled counters appear at their first increment) be scraped a few times.
            wait_for(lambda: all(scraped_at_least(base, sel, 3) for sel in SERIES.values()),
                     10, "more scrapes of the workload's series")
        yield result
    # Nothing is left: processes (conmon included), mounts, the pod's network namespace.
    assert pids_mentioning(str(tmp)) == [], "processes of the test left running"
    assert str(tmp) not in Path("/proc/self/mounts").read_text()
    assert not Path(f"/var/run/netns/shoal-{pod_id[:32]}").exists()


def test_every_shoal_process_is_an_up_target_with_service_and_node(stack: Stack) -> None:
    active = prom_get(stack.prom, "/api/v1/targets")["activeTargets"]
    services = sorted(t["labels"]["service"] for t in active)
    assert services == sorted(["launcher", *(s.name for s in SERVICES)])
    for target in active:
        assert target["health"] == "up", target
        assert target["labels"]["job"] == "shoal" and target["labels"]["node"] == NODE, target
    # Prometheus scrapes exactly the /metrics addresses `shoal up` printed.
    printed = set(re.findall(r"http://[\d.:]+/metrics", stack.summary))
    assert {t["scrapeUrl"] for t in active} == printed
    up = query(stack.prom, f'up{{job="shoal", node="{NODE}"}}')
    assert sorted(r["metric"]["service"] for r in up) == services
    assert all(r["value"][1] == "1" for r in up)
    # Relabeling: the launcher's per-child series carry the child's service (not
    # "launcher"), and no exported_* copies of service/node are left anywhere.
    children = query(stack.prom, f'shoal_launcher_children_running{{node="{NODE}"}}')
    # The embedded nats-server is supervised like the services.
    assert sorted(r["metric"]["service"] for r in children) == sorted(
        ["nats", *(s.name for s in SERVICES)])
    assert all(r["value"][1] == "1" for r in children)
    for label in ("exported_service", "exported_node"):
        assert query(stack.prom, f'count({{job="shoal", {label}!=""}})') == [], label
    info = query(stack.prom, f'shoal_service_info{{node="{NODE}"}}')
    assert sorted(r["metric"]["service"] for r in info) == services


def test_pull_and_pod_start_move_the_series(stack: Stack) -> None:
    moved = {key: stack.after[key] - stack.before[key] for key in SERIES}
    short = {key: (moved[key], n) for key, n in EXPECTED_INCREASE.items() if moved[key] < n}
    assert not short, f"series that did not move enough (moved, expected): {short}"
    # Besides the pause process and `sleep` running (above), the quitter has stopped.
    stopped = total(stack.prom, 'shoal_supervisor_tasks{state="stopped"}')
    assert stopped >= 1


def test_dashboard_queries_parse_and_return_data(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 20
    doc = METRICS_DOC.read_text()
    failures = []
    for title, expr in exprs:
        # Every Shoal metric the dashboard uses is in the catalogue.
        for name in re.findall(r"\bshoal_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if f"`{base}`" not in doc:
                failures.append(f"{title}: {base} is not in docs/metrics.md")
        try:
            if not query(stack.prom, substitute(expr)):
                failures.append(f"{title}: no data: {expr}")
        except PromError as exc:
            failures.append(f"{title}: {exc}: {expr}")
    # Query variables (label_values(selector, label)) must offer values too.
    for var in variables.values():
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert match, var["definition"]
        values = prom_get(stack.prom, f"/api/v1/label/{match[2]}/values",
                          [("match[]", substitute(match[1]))])
        if not values:
            failures.append(f"variable {var['name']}: no values for {var['definition']}")
    # Every panel and query uses the dashboard's datasource variable.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            uids = {panel["datasource"]["uid"], *(t["datasource"]["uid"]
                                                  for t in panel["targets"])}
            if uids != {"${datasource}"}:
                failures.append(f"{panel['title']}: datasource {uids}")
    assert not failures, "\n".join(failures)


def test_every_shoal_metric_is_in_the_catalogue(stack: Stack) -> None:
    """Every shoal_* series Prometheus scraped from the running services is documented in
    docs/metrics.md (histogram suffixes folded into their family)."""
    names = prom_get(stack.prom, "/api/v1/label/__name__/values")
    doc = METRICS_DOC.read_text()
    # `X_created` is prometheus_client's companion of counter `X_total` / histogram `X`.
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names
                if n.startswith("shoal_") and not n.endswith("_created")}
    assert len(families) >= 30
    missing = sorted(f for f in families if f"`{f}`" not in doc)
    assert missing == [], f"not in docs/metrics.md: {missing}"
