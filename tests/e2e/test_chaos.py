"""Crash boundaries: kill -9 any Shoal process at any moment, and kubelet sees no failed
call, no pod is lost or leaked.

A real `shoal up` runs pod lives the way kubelet drives them (tests/support/chaos.py:
RunPodSandbox, CreateContainer, StartContainer, wait for the exit, check its code and CRI
log line, StopPodSandbox, RemovePodSandbox; UNAVAILABLE and DEADLINE_EXCEEDED retried for
up to 60 s, a failed create made anew with the next attempt) while a random service, or
the embedded nats-server, is SIGKILLed every few seconds and `shoal up` restarts it. Five
long-lived containers started before the kills must still run with their original
processes, and once `shoal up` stops nothing of the node may be left on the host. The seed
fixes every life's container and the order of the kill targets (their moments follow the
clock); it is printed (`pytest -s`) with what each run saw. bench/churn.py runs the same
churn bigger, by hand.
"""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path

import pytest
from shoal_cli.supervision import HEALTHY_AFTER, RestartPolicy
from support.chaos import ChaosReport, ChaosSettings, run_chaos
from support.chaos_nodes import NATS, SERVICES, ShoalUp
from support.shoal import host_names, images_fixture  # noqa: F401

pytestmark = pytest.mark.e2e

SEED = 20261202
# Their own pod subnets and bridges, apart from every other test's.
_networks = itertools.count(1)


async def churn(tmp_path: Path, images: dict[str, str], settings: ChaosSettings
                ) -> ChaosReport:
    n = next(_networks)
    up = ShoalUp(tmp_path, f"chaos{uuid.uuid4().hex[:8]}", images, f"10.225.{n}.0/24",
                 f"shoalchaos{n}")
    before = host_names()
    print(f"\nchaos seed {settings.seed}: {settings.lives} lives, {settings.concurrency} at a "
          f"time, a random one of {', '.join(settings.targets)} killed every "
          f"{settings.kill_every:g} s")
    report = await run_chaos(up, settings, before)
    print(report.summary())
    for line in report.details():
        print(f"  {line}")
    return report


def assert_clean(report: ChaosReport) -> None:
    assert report.failures == [], "failed calls after kubelet's retries"
    assert report.exits == [], "lost or wrong exit codes, missing log lines"
    assert report.survivors == [], "long-lived containers lost their processes"
    assert report.leaks == [], "left behind"
    assert report.up_exit == 0
    s = report.settings
    assert report.lives_done >= s.lives
    # The kills did happen (at least half of those due), and each was restarted.
    killed = sum(1 for k in report.kills if k.pid)
    assert killed >= s.min_churn / s.kill_every / 2, report.kills
    assert report.restarts >= killed


def test_a_sigkilled_child_is_restarted_at_once_however_soon() -> None:
    """Killed from outside is no crash loop: no backoff, even right after a restart."""
    policy = RestartPolicy(initial=0.5, maximum=30.0)
    assert [policy.delay(0.2, killed=True) for _ in range(10)] == [0.0] * 10
    assert not policy.crash_looping
    assert [policy.delay(None), policy.delay(0.1)] == [0.0, 0.5]  # a real loop still backs off
    assert policy.delay(HEALTHY_AFTER) == 0.0


async def test_pods_churn_while_a_random_service_is_killed_every_2_s(
        tmp_path: Path, images: dict[str, str]) -> None:
    report = await churn(tmp_path, images, ChaosSettings(
        lives=12, concurrency=4, min_churn=30, kill_every=2.0, targets=SERVICES, seed=SEED,
        deadline=120))
    assert_clean(report)


async def test_pods_churn_while_the_nats_server_is_killed_every_2_s(
        tmp_path: Path, images: dict[str, str]) -> None:
    report = await churn(tmp_path, images, ChaosSettings(
        lives=8, concurrency=3, min_churn=24, kill_every=2.0, targets=(NATS,), seed=SEED,
        deadline=90))
    assert_clean(report)
