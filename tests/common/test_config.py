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


@pytest.mark.parametrize(("override", "message"), [
    ('services.puller.registries."https://docker.io".mirrors=[]',
     'registries."https://docker.io": \'https://docker.io\' is not a registry host '
     "(name the registry as image references do"),
    ('services.puller.registries."docker.io/library".plain_http=true',
     "is not a registry host"),
    ('services.puller.registries."docker.io".mirrors=["mirror.local:5000"]',
     'mirrors[0]: \'mirror.local:5000\' is not an http:// or https:// URL'),
    ('services.puller.registries."docker.io".ca_file="/nonexistent/ca.pem"',
     "ca_file: /nonexistent/ca.pem: no such file"),
    ('services.puller.registries."docker.io".mirros=[]', "mirros: unknown key"),
    ("services.puller.max_concurrent_downloads=0", "max_concurrent_downloads: must be >= 1"),
])
def test_malformed_registry_settings_are_refused_loudly(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=[override])
    assert message in str(info.value)


def test_registry_settings_accepted() -> None:
    cfg = load_config(env={}, overrides=[
        'services.puller.registries."docker.io".mirrors=["http://127.0.0.1:5000", '
        '"https://mirror.example/prefix"]',
        'services.puller.registries."localhost:5000".plain_http=true'])
    assert cfg.services.puller.registries["docker.io"].mirrors[1] == "https://mirror.example/prefix"
    assert cfg.services.puller.registries["localhost:5000"].plain_http
