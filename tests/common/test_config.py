"""Configuration: defaults, precedence, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from shoal_common.config import ConfigError, load_config


def test_defaults_are_documented_values() -> None:
    cfg = load_config(env={})
    assert cfg.state_root == "/var/lib/shoal"
    assert cfg.run_root == "/run/shoal"
    assert cfg.nats.url == "nats://127.0.0.1:4222"
    assert cfg.services.puller.metrics_addr == "127.0.0.1:9711"
    assert cfg.cri_socket == "/run/shoal/cri.sock"


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "shoal.toml"
    path.write_text('node_id = "from-file"\n[nats]\nurl = "nats://file:4222"\n'
                    'request_retries = 1\n')
    cfg = load_config(str(path), env={"SHOAL_NATS__URL": "nats://env:4222",
                                      "SHOAL_NATS__REQUEST_RETRIES": "4"})
    assert (cfg.node_id, cfg.nats.url, cfg.nats.request_retries) == (
        "from-file", "nats://env:4222", 4)
    cfg = load_config(str(path), env={"SHOAL_NATS__URL": "nats://env:4222"},
                      overrides=["nats.url=nats://set:4222"], flags={"node_id": "flag"})
    assert (cfg.node_id, cfg.nats.url) == ("flag", "nats://set:4222")


@pytest.mark.parametrize(("toml", "key"), [
    ('[nats]\nurl = 5\n', "nats.url"),
    ('[nats]\nurl = "http://x"\n', "nats.url"),
    ('[services.puller]\nmetrics_addr = "nope"\n', "services.puller.metrics_addr"),
    ('[services.puller]\nmirros = []\n', "services.puller.mirros"),
    ('node_id = "a.b"\n', "node_id"),
    ('state_root = "relative"\n', "state_root"),
    ('[log]\nlevel = "loud"\n', "log.level"),
    ('colour = "blue"\n', "colour"),
])
def test_invalid_config_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=rf"config key {key}:"):
        load_config(str(path), env={})


def test_unparseable_file_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[nats\n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_config(str(path), env={})


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(str(tmp_path / "absent.toml"), env={})


def test_example_config_documents_the_defaults() -> None:
    """deploy/config.example.toml must load and say what the defaults really are."""
    import msgspec

    example = Path(__file__).parents[2] / "deploy" / "config.example.toml"
    loaded = msgspec.to_builtins(load_config(str(example), env={}))
    defaults = msgspec.to_builtins(load_config(env={}))
    assert loaded == defaults
