"""containerd's hosts.toml as the puller reads it: each key, each refusal (file and key
named), Docker's certificate files, directory names, TLS files and re-reading on change."""

from __future__ import annotations

import os
import shutil
import ssl
from pathlib import Path

import pytest
from shoal_common.config import ConfigError, load_config
from shoal_puller.registry.hosts_dir import (
    ALL_CAPABILITIES,
    HostDir,
    HostsError,
    parse_host_dir,
    with_tls,
)
from shoal_puller.registry.hosts_tree import HostsDir, dir_names
from support.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def host_dir(root: Path, name: str, text: str | None = None, **files: Path | str) -> Path:
    """`root/name` with a hosts.toml holding `text` (none when None) and `files` copied in
    (a str value: that text)."""
    d = root / name
    d.mkdir(parents=True)
    if text is not None:
        (d / "hosts.toml").write_text(text)
    for file, src in files.items():
        target = d / file.replace("__", ".")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, Path):
            shutil.copy(src, target)
        else:
            target.write_text(src)
    return d


def parse(tmp_path: Path, text: str, **files: Path | str) -> HostDir:
    return parse_host_dir(host_dir(tmp_path, "reg.example", text, **files))


def refused(tmp_path: Path, text: str, **files: Path | str) -> HostsError:
    with pytest.raises(HostsError) as info:
        parse(tmp_path, text, **files)
    assert info.value.file == tmp_path / "reg.example" / "hosts.toml"
    return info.value


# ----------------------------------------------------------------- server and host URLs


def test_server_and_hosts_in_file_order(tmp_path: Path) -> None:
    hd = parse(tmp_path, '''
server = "https://registry-1.docker.io"    # Exclude this to not use upstream

[host."https://public-mirror.example.com"]
  capabilities = ["pull"]
[host."https://docker-mirror.internal"]
  capabilities = ["pull", "resolve"]
[host."https://public-mirror.example.com".header]
  x-later = "still the first host's"
''')
    assert [str(e.url) for e in hd.entries] == [
        "https://public-mirror.example.com/v2", "https://docker-mirror.internal/v2",
        "https://registry-1.docker.io/v2"]
    assert [e.capabilities for e in hd.entries] == [
        {"pull"}, {"pull", "resolve"}, ALL_CAPABILITIES]
    assert hd.entries[0].headers == (("x-later", "still the first host's"),)
    assert [e.table for e in hd.entries] == [
        'host."https://public-mirror.example.com"', 'host."https://docker-mirror.internal"', ""]


def test_urls_scheme_path_and_override_path(tmp_path: Path) -> None:
    hd = parse(tmp_path, '''
server = "reg.example:5000/prefix/"
[host."http://10.0.0.1:5000"]
[host."https://mirror.example/v2"]
[host."https://non-compliant-mirror.registry/v2/upstream"]
  override_path = true
[host."https://root-api.example"]
  override_path = true
''')
    assert [(str(e.url), e.name) for e in hd.entries] == [
        ("http://10.0.0.1:5000/v2", "http://10.0.0.1:5000"),
        ("https://mirror.example/v2", "https://mirror.example/v2"),
        ("https://non-compliant-mirror.registry/v2/upstream",
         "https://non-compliant-mirror.registry/v2/upstream"),
        ("https://root-api.example/", "https://root-api.example"),
        # No scheme: https, as containerd adds it.
        ("https://reg.example:5000/prefix/v2", "https://reg.example:5000/prefix")]


def test_without_server_the_registry_itself_is_last_with_every_capability(
        tmp_path: Path) -> None:
    hd = parse(tmp_path, '''
capabilities = ["pull"]   # containerd ignores it without a server: so does Shoal
ca = "ca.pem"
[host."https://registry.example.com"]
  capabilities = ["pull", "resolve"]
''', ca__pem="x")
    last = hd.entries[-1]
    assert last.url is None and last.capabilities == ALL_CAPABILITIES
    assert last.ca == (str(tmp_path / "reg.example" / "ca.pem"),)


@pytest.mark.parametrize(("text", "key", "why"), [
    ("server = 5", "server", "must be a URL"),
    ('server = "ftp://reg.example"', "server", "not an http:// or https:// URL"),
    ('server = "https://u:p@reg.example"', "server", "no credentials, query or fragment"),
    ('server = "https://reg.example/?x=1"', "server", "no credentials, query or fragment"),
    ('server = "https://reg.example:99999"', "server", "is not a URL"),
    ('[host."https://m:0"]', 'host."https://m:0"', "port 0 is out of range"),
    ('[host."https://"]', 'host."https://"', "with a host"),
    ('host = "https://m"', "host", 'must be tables: [host."https://mirror.example"]'),
    ('host."https://m" = 1', 'host."https://m"', "must be a table, not an integer"),
])
def test_bad_urls_are_refused(tmp_path: Path, text: str, key: str, why: str) -> None:
    error = refused(tmp_path, text)
    assert error.key == key and why in error.why, error


# ---------------------------------------------------------------------- capabilities


def test_capabilities(tmp_path: Path) -> None:
    hd = parse(tmp_path, '''
[host."https://a"]
  capabilities = ["Pull", "RESOLVE"]   # containerd compares them in lower case
[host."https://b"]
  capabilities = []                    # as in containerd: empty means every one
[host."https://c"]
  capabilities = ["push"]
[host."https://d"]
''')
    assert [e.capabilities for e in hd.entries[:4]] == [
        {"pull", "resolve"}, ALL_CAPABILITIES, {"push"}, ALL_CAPABILITIES]


@pytest.mark.parametrize(("value", "key", "why"), [
    ('["pull", "pul"]', 'host."https://m".capabilities[1]', "'pul' is not one of pull, "
                                                            "resolve, push"),
    ("[1]", 'host."https://m".capabilities[0]', "1 is not one of"),
    ('"pull"', 'host."https://m".capabilities', 'must be a list such as ["pull", '),
])
def test_bad_capabilities_are_refused(tmp_path: Path, value: str, key: str, why: str) -> None:
    error = refused(tmp_path, f'[host."https://m"]\ncapabilities = {value}\n')
    assert (error.key, why in error.why) == (key, True), error


# ------------------------------------------------------------------ ca and client files


def test_ca_string_or_list_relative_to_the_host_dir(tmp_path: Path, pki: Pki) -> None:
    elsewhere = tmp_path / "elsewhere.pem"
    shutil.copy(pki.ca, elsewhere)
    hd = parse(tmp_path, f'''
ca = "ca.pem"
[host."https://m"]
  ca = ["ca.pem", "{elsewhere}", "sub/ca.pem"]
''', ca__pem=pki.ca, **{"sub/ca__pem": pki.ca})
    here = tmp_path / "reg.example"
    assert hd.entries[-1].ca == (str(here / "ca.pem"),)
    assert hd.entries[0].ca == (str(here / "ca.pem"), str(elsewhere), str(here / "sub/ca.pem"))


def test_missing_or_mistyped_ca_is_refused(tmp_path: Path) -> None:
    error = refused(tmp_path, '[host."https://m"]\nca = ["ca.pem", "gone.pem"]\n', ca__pem="x")
    assert error.key == 'host."https://m".ca[1]'
    assert error.why == f"{tmp_path / 'reg.example' / 'gone.pem'}: no such file"
    shutil.rmtree(tmp_path / "reg.example")
    assert refused(tmp_path, "ca = 3\n").why == "must be a path or a list of paths, not an " \
                                                "integer (3)"
    shutil.rmtree(tmp_path / "reg.example")
    assert refused(tmp_path, 'ca = [""]\n').key == "ca[0]"


def test_client_forms(tmp_path: Path) -> None:
    files = {"c__pem": "c", "c__key": "k", "both__pem": "ck", "c2__pem": "c2"}
    hd = parse(tmp_path, '''
[host."https://one"]
  client = "both.pem"
[host."https://list"]
  client = ["both.pem", "c2.pem"]
[host."https://pairs"]
  client = [["c.pem", "c.key"], ["both.pem", ""], "c2.pem"]
''', **files)
    d = str(tmp_path / "reg.example")
    assert [e.client for e in hd.entries[:3]] == [
        ((f"{d}/both.pem", ""),),
        ((f"{d}/both.pem", ""), (f"{d}/c2.pem", "")),
        ((f"{d}/c.pem", f"{d}/c.key"), (f"{d}/both.pem", ""), (f"{d}/c2.pem", ""))]


@pytest.mark.parametrize(("value", "key", "why"), [
    ('[["c.pem", "gone.key"]]', "client[0][1]", "gone.key: no such file"),
    ('[["gone.pem", "c.key"]]', "client[0][0]", "gone.pem: no such file"),
    ('"gone.pem"', "client", "gone.pem: no such file"),
    ('[["c.pem", "c.key", "x"]]', "client[0]", 'must be a path or a ["cert", "key"] pair'),
    ('[["c.pem", 2]]', "client[0][1]", "must be a path, not an integer"),
    ("true", "client", "must be a path, a list of paths or a list of"),
])
def test_bad_client_is_refused(tmp_path: Path, value: str, key: str, why: str) -> None:
    error = refused(tmp_path, f"client = {value}\n", c__pem="c", c__key="k")
    assert error.key == key and why in error.why, error


# --------------------------------------------------------- skip_verify, header, others


def test_skip_verify_header_override_path_dial_timeout(tmp_path: Path) -> None:
    hd = parse(tmp_path, '''
skip_verify = false
dial_timeout = "1m30.5s"
[header]
  x-custom-1 = "custom header"
  x-custom-1-2 = ["part a", "part b"]
  x-empty = []
[host."https://m"]
  skip_verify = true
  dial_timeout = "250ms"
''')
    mirror, server = hd.entries
    assert (mirror.skip_verify, mirror.dial_timeout, mirror.headers) == (True, 0.25, ())
    assert server.skip_verify is False and server.explicit_tls  # false still counts
    assert server.dial_timeout == 90.5
    assert server.headers == (("x-custom-1", "custom header"),
                              ("x-custom-1-2", "part a, part b"))


@pytest.mark.parametrize(("text", "key", "why"), [
    ('skip_verify = "yes"', "skip_verify", "must be true or false, not a string ('yes')"),
    ("override_path = 1", "override_path", "must be true or false, not an integer"),
    ('header = "x"', "header", "must be a table of header names"),
    ('header."bad name" = "x"', "header.bad name", "not an HTTP header"),
    ("header.x-a = 1", "header.x-a", "must be a string or a list of strings"),
    ('header.x-a = ["a", 1]', "header.x-a", "must be a string or a list of strings"),
    ('header.x-a = "a\\r\\nInjected: 1"', "header.x-a", "may not hold CR, LF or NUL"),
    ('dial_timeout = "5"', "dial_timeout", "not a duration"),
    ("dial_timeout = 5", "dial_timeout", "not a duration"),
    ('dial_timeout = "0s"', "dial_timeout", "must be more than 0"),
])
def test_bad_values_are_refused(tmp_path: Path, text: str, key: str, why: str) -> None:
    error = refused(tmp_path, f'[host."https://m"]\n{text}\n')
    assert error.key == f'host."https://m".{key}' and why in error.why, error


@pytest.mark.parametrize(("text", "key", "why"), [
    ("mirrors = []", "mirrors", "unknown key (hosts.toml keys: ca, capabilities, client, "
                                "dial_timeout, header, host, override_path, server, "
                                "skip_verify)"),
    ('[host."https://m"]\nskip-verify = true', 'host."https://m".skip-verify',
     "unknown key (hosts.toml keys: ca, capabilities, client, dial_timeout, header, "
     "override_path, skip_verify)"),
    ('proxy = "http://p:8080"', "proxy", "not supported by Shoal"),
    ('[host."https://m"]\nserver = "https://x"', 'host."https://m".server',
     "belongs at the top level"),
    ('[host."http://m"]\n[host."http://m".host."http://double"]', 'host."http://m".host',
     "hosts do not nest"),
])
def test_unknown_keys_are_refused(tmp_path: Path, text: str, key: str, why: str) -> None:
    error = refused(tmp_path, text + "\n")
    assert error.key == key and why in error.why, error


def test_bad_toml_is_refused_naming_the_file(tmp_path: Path) -> None:
    error = refused(tmp_path, '[host."https://m"\ncapabilities = ["pull"]\n')
    assert error.key == "" and error.why.startswith("not valid TOML: ")
    assert str(error).startswith(f"{tmp_path / 'reg.example' / 'hosts.toml'}: not valid TOML")
    (tmp_path / "reg.example" / "hosts.toml").write_bytes(b"server = \"\xff\"\n")
    with pytest.raises(HostsError, match="not UTF-8 text"):
        parse_host_dir(tmp_path / "reg.example")


# ---------------------------------------------------------- Docker's certificate files


def test_certificate_files_without_hosts_toml(tmp_path: Path, pki: Pki) -> None:
    for text in (None, ""):  # no hosts.toml, or an empty one: the same, as in containerd
        d = host_dir(tmp_path / repr(text), "reg.example", text, ca__crt=pki.ca,
                     other__crt=pki.ca, client__cert=pki.client_cert,
                     client__key=pki.client_key, lone__cert="x", notes__txt="ignored")
        (d / "sub.crt").mkdir()  # a directory is not a certificate
        hd = parse_host_dir(d)
        (entry,) = hd.entries
        assert entry.url is None and entry.capabilities == ALL_CAPABILITIES
        assert entry.ca == (f"{d}/ca.crt", f"{d}/other.crt")
        assert entry.client == ((f"{d}/client.cert", f"{d}/client.key"),
                                (f"{d}/lone.cert", ""))
        # The lone certificate has no key in its file: refused when TLS is made, naming it.
        with pytest.raises(HostsError) as info:
            with_tls(hd)
        assert info.value.file == d / "lone.cert" and info.value.key == ""


# ------------------------------------------------------------------------------ TLS


def test_tls_contexts(tmp_path: Path, pki: Pki) -> None:
    hd = with_tls(parse(tmp_path, '''
[host."https://verified"]
  ca = "ca.pem"
  client = [["client.pem", "client.key"]]
[host."https://skipped"]
  skip_verify = true
[host."https://system"]
''', ca__pem=pki.ca, client__pem=pki.client_cert, client__key=pki.client_key))
    verified, skipped, system, server = (e.tls for e in hd.entries)
    assert isinstance(verified, ssl.SSLContext) and verified.verify_mode == ssl.CERT_REQUIRED
    assert any("shoal test CA" in str(c.get("subject")) for c in verified.get_ca_certs())
    assert isinstance(skipped, ssl.SSLContext) and skipped.verify_mode == ssl.CERT_NONE
    assert not skipped.check_hostname
    assert system is None and server is None  # no TLS settings: the system trust store


@pytest.mark.parametrize(("text", "key"), [
    ('ca = ["ca.pem", "junk.pem"]', "ca[1]"),
    ('client = [["client.pem", "client.key"], ["client.pem", "junk.pem"]]', "client[1]"),
    ('client = "client.pem"', "client[0]"),  # a certificate without its key in the file
])
def test_unloadable_tls_files_are_refused(tmp_path: Path, pki: Pki, text: str,
                                          key: str) -> None:
    hd = parse(tmp_path, f'[host."https://m"]\n{text}\n', ca__pem=pki.ca,
               junk__pem="not PEM\n", client__pem=pki.client_cert,
               client__key=pki.client_key)
    with pytest.raises(HostsError) as info:
        with_tls(hd)
    assert info.value.file == tmp_path / "reg.example" / "hosts.toml"
    assert info.value.key == f'host."https://m".{key}' and "cannot load" in info.value.why


# ------------------------------------------------------------- directories and reload


def test_directory_names_in_containerd_order() -> None:
    assert dir_names("reg.example:5000") == ["reg.example_5000_", "reg.example:5000",
                                             "_default"]
    assert dir_names("docker.io") == ["docker.io", "_default"]
    assert dir_names("[::1]:5000") == ["[::1]_5000_", "[::1]:5000", "_default"]


def test_for_domain_picks_the_first_directory_that_exists(tmp_path: Path) -> None:
    host_dir(tmp_path, "_default", 'server = "https://default.example"')
    host_dir(tmp_path, "reg.example:5000", 'server = "https://colon.example"')
    (tmp_path / "README").write_text("files beside the directories are ignored")
    hosts = HostsDir(tmp_path, recheck=0)
    hosts.load_all()

    def server(domain: str) -> str:
        hd = hosts.for_domain(domain)
        assert hd is not None
        return str(hd.entries[-1].url)

    assert server("reg.example:5000") == "https://colon.example/v2"
    assert server("other.example") == "https://default.example/v2"
    host_dir(tmp_path, "reg.example_5000_", 'server = "https://underscore.example"')
    assert server("reg.example:5000") == "https://underscore.example/v2"
    shutil.rmtree(tmp_path / "_default")
    assert hosts.for_domain("other.example") is None


def test_changes_are_read_again_and_a_broken_file_refused_until_fixed(tmp_path: Path) -> None:
    d = host_dir(tmp_path, "reg.example", '[host."https://m1"]\n')
    hosts = HostsDir(tmp_path, recheck=0)
    hosts.load_all()
    first = hosts.for_domain("reg.example")
    assert first is not None and first.entries[0].name == "https://m1"
    assert hosts.for_domain("reg.example") is first  # unchanged: not parsed again

    (d / "hosts.toml").write_text('[host."https://m2"]\ncapabilities = ["pul"]\n')
    with pytest.raises(HostsError) as info:
        hosts.for_domain("reg.example")
    assert info.value.key == 'host."https://m2".capabilities[0]'

    (d / "hosts.toml").write_text('[host."https://m2"]\ncapabilities = ["pull"]\n')
    fixed = hosts.for_domain("reg.example")
    assert fixed is not None and fixed.entries[0].name == "https://m2"


def test_a_changed_file_outside_the_directory_is_noticed(tmp_path: Path, pki: Pki) -> None:
    ca = tmp_path / "shared" / "ca.pem"
    ca.parent.mkdir()
    shutil.copy(pki.ca, ca)
    host_dir(tmp_path / "tree", "reg.example", f'ca = "{ca}"\n')
    hosts = HostsDir(tmp_path / "tree", recheck=0)
    hosts.load_all()
    assert hosts.for_domain("reg.example") is not None
    ca.write_text("no longer PEM\n")
    os.utime(ca, ns=(1, 1))
    with pytest.raises(HostsError, match="cannot load"):
        hosts.for_domain("reg.example")


def test_recheck_interval_spares_the_disk(tmp_path: Path) -> None:
    d = host_dir(tmp_path, "reg.example", '[host."https://m1"]\n')
    hosts = HostsDir(tmp_path, recheck=3600)
    hosts.load_all()
    (d / "hosts.toml").write_text("not toml at all [\n")
    hd = hosts.for_domain("reg.example")  # within the interval: what was read
    assert hd is not None and hd.entries[0].name == "https://m1"


def test_start_refuses_any_bad_directory_and_the_builtin_host(tmp_path: Path) -> None:
    host_dir(tmp_path, "good.example", '[host."https://m"]\n')
    host_dir(tmp_path, "bad.example", "server = 1\n")
    with pytest.raises(HostsError, match=r"bad\.example/hosts\.toml: server: must be a URL"):
        HostsDir(tmp_path).load_all()
    shutil.rmtree(tmp_path / "bad.example")
    HostsDir(tmp_path).load_all()
    host_dir(tmp_path, "shoal.local_5000_")
    with pytest.raises(HostsError, match="built-in image host"):
        HostsDir(tmp_path).load_all()


def test_the_config_checks_only_the_path(tmp_path: Path) -> None:
    """Every process and CLI command checks the config: the tree's files are the puller's
    to read, so one being edited stops nothing else."""
    host_dir(tmp_path, "reg.example", '[host."https://m"]\ncapabilities = ["fetch"]\n')
    cfg = load_config(env={}, overrides=[f'services.puller.config_path="{tmp_path}"'])
    assert cfg.services.puller.config_path == str(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=['services.puller.config_path="certs.d"'])
    assert str(info.value) == ("config key services.puller.config_path: 'certs.d' must be "
                               "an absolute path")
    with pytest.raises(ConfigError, match="no such directory"):
        load_config(env={}, overrides=[f'services.puller.config_path="{tmp_path}/none"'])
