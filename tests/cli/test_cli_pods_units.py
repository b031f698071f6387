"""The CLI's own parsing: CRI log lines (partial lines joined), ages, --publish, --memory,
--user."""

from __future__ import annotations

import pytest
from cri_api.v1 import api_pb2 as cri
from shoal_cli.cri_client import CliError
from shoal_cli.cri_logs import LogDecoder
from shoal_cli.output import ago
from shoal_cli.run import _memory, _port, _security

TS = "2026-01-02T03:04:05.123456789Z"


def test_log_decoder_joins_partial_lines_per_stream() -> None:
    d = LogDecoder()
    lines = (f"{TS} stdout P abc\n{TS} stderr F oops\n{TS} stdout P def\n"
             f"{TS} stdout F ghi\n{TS} stdout F \n{TS} stdout F:x tagged\n").encode()
    # Fed in arbitrary pieces, as a growing file is read.
    out = d.feed(lines[:10]) + d.feed(lines[10:57]) + d.feed(lines[57:])
    assert out == [("stderr", b"oops\n"), ("stdout", b"abcdefghi\n"), ("stdout", b"\n"),
                   ("stdout", b"tagged\n")]
    assert d.feed(f"{TS} stderr P cut".encode()) == []  # no newline yet
    assert d.feed(b"\n") == [] and d.flush() == [("stderr", b"cut")]
    assert d.feed(b"garbage line\n") == []


def test_ago() -> None:
    now = 1_000_000.0
    ns = int(now * 1e9)
    assert ago(ns, now) == "Less than a second ago"
    assert ago(ns - 5 * 10**9, now) == "5 seconds ago"
    assert ago(ns - 90 * 10**9, now) == "About a minute ago"
    assert ago(ns - 600 * 10**9, now) == "10 minutes ago"
    assert ago(ns - 3 * 3600 * 10**9, now) == "3 hours ago"
    assert ago(ns - 3 * 86400 * 10**9, now) == "3 days ago"


def test_run_option_parsing() -> None:
    assert _memory("64m") == 64 << 20 and _memory("1024") == 1024 and _memory("2G") == 2 << 30
    with pytest.raises(CliError, match="--memory"):
        _memory("lots")
    p = _port("8080:80")
    assert (p.host_port, p.container_port, p.protocol, p.host_ip) == (8080, 80, cri.TCP, "")
    p = _port("127.0.0.1:5353:53/udp")
    assert (p.host_port, p.container_port, p.protocol, p.host_ip) == (5353, 53, cri.UDP,
                                                                      "127.0.0.1")
    for bad in ("80", "a:b", "1:2/icmp"):
        with pytest.raises(CliError, match="--publish"):
            _port(bad)
    sec = _security("1000:2000")
    assert (sec.run_as_user.value, sec.run_as_group.value) == (1000, 2000)
    sec = _security("app")
    assert sec.run_as_username == "app" and not sec.HasField("run_as_user")
    with pytest.raises(CliError, match="numeric gid"):
        _security("app:staff")
