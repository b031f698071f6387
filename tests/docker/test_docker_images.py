"""The image endpoints through Debian's docker CLI and the docker SDK: pull (streamed
progress), images/inspect/tag/rmi/history, save | load, prune, and Docker's errors."""

from __future__ import annotations

import json
import re
import subprocess

from support.docker import docker_node_fixture
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("images")


def _curl(dnode, method: str, path: str) -> tuple[int, str]:
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(dnode.socket),
                          "-X", method, f"http://docker/v1.41{path}"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    body, code = out.rsplit("\n", 1)
    return int(code), body


def _inspect(dnode, ref: str) -> dict:
    return json.loads(dnode.out("image", "inspect", ref))[0]


def test_pull_streams_progress_then_lists_and_inspects(dnode, images) -> None:
    ref = images["busybox"]
    proc = dnode.docker("pull", ref)
    out = proc.stdout.decode()
    repo = ref.rsplit(":", 1)[0]
    assert f"1: Pulling from {repo.split('/', 1)[1]}" in out
    assert re.search(r"^[0-9a-f]{12}: (Pull complete|Already exists)$", out, re.M), out
    assert re.search(r"^Digest: sha256:[0-9a-f]{64}$", out, re.M), out
    assert f"Status: Downloaded newer image for {ref}" in out
    again = dnode.out("pull", ref)
    assert f"Status: Image is up to date for {ref}" in again

    info = _inspect(dnode, ref)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", info["Id"])
    assert ref in info["RepoTags"]
    assert info["RepoDigests"] and info["RepoDigests"][0].startswith(f"{repo}@sha256:")
    assert info["Os"] == "linux" and info["Architecture"]
    assert info["RootFS"]["Type"] == "layers" and info["RootFS"]["Layers"]
    assert info["Config"]["Cmd"] or info["Config"]["Entrypoint"]
    assert info["Size"] > 0

    rows = dnode.out("images", "--format", "{{.Repository}} {{.Tag}} {{.ID}}").splitlines()
    assert f"{repo} 1 {info['Id'][7:19]}" in rows
    # by short id, by full id
    assert _inspect(dnode, info["Id"][7:19])["Id"] == info["Id"]
    assert dnode.out("images", "-q", "--no-trunc", "--filter", f"reference={repo}") == info["Id"]
    assert dnode.out("images", "-q", "--filter", "reference=nosuch/*") == ""
    assert dnode.out("images", "-q", "--filter", "dangling=true") == ""
    by_digest = dnode.out("pull", info["RepoDigests"][0])
    assert f"Status: Image is up to date for {info['RepoDigests'][0]}" in by_digest


def test_tag_then_rmi_untags_only_that_name(dnode, images) -> None:
    ref = images["busybox"]
    dnode.docker("pull", "-q", ref)
    image_id = _inspect(dnode, ref)["Id"]
    dnode.docker("tag", ref, "shoaltest/busy:two")
    assert _inspect(dnode, "shoaltest/busy:two")["Id"] == image_id
    assert "shoaltest/busy:two" in _inspect(dnode, ref)["RepoTags"]
    rows = dnode.out("images", "--format", "{{.Repository}}:{{.Tag}}",
                     "--filter", "reference=shoaltest/*")
    assert rows == "shoaltest/busy:two"
    out = dnode.out("rmi", "shoaltest/busy:two")
    assert "Untagged: shoaltest/busy:two" in out and "Deleted" not in out
    assert _inspect(dnode, ref)["Id"] == image_id
    assert "shoaltest/busy:two" not in _inspect(dnode, ref)["RepoTags"]
    missing = dnode.docker("image", "inspect", "shoaltest/busy:two", check=False)
    assert missing.returncode != 0 and b"No such image" in missing.stderr


def test_history_lists_layers_newest_first(dnode, images) -> None:
    ref = images["busybox"]
    dnode.docker("pull", "-q", ref)
    image_id = _inspect(dnode, ref)["Id"]
    rows = dnode.out("history", "--format", "{{.ID}}|{{.Size}}", ref).splitlines()
    assert rows and rows[0].split("|")[0] == image_id[7:19]
    sdk_rows = dnode.sdk().images.get(ref).history()
    assert sdk_rows[0]["Id"] == image_id and ref in sdk_rows[0]["Tags"]
    assert sum(r["Size"] for r in sdk_rows) > 0


def test_save_then_load_round_trip_keeps_the_id(dnode, images, tmp_path) -> None:
    ref = images["busybox"]
    dnode.docker("pull", "-q", ref)
    image_id = _inspect(dnode, ref)["Id"]
    archive = dnode.docker("save", ref).stdout
    assert len(archive) > 10_000
    listing = subprocess.run(["tar", "-t"], input=archive, capture_output=True, check=True)
    assert b"manifest.json" in listing.stdout
    out = dnode.out("rmi", ref)
    assert f"Untagged: {ref}" in out and f"Deleted: {image_id}" in out
    assert dnode.docker("image", "inspect", ref, check=False).returncode != 0
    loaded = dnode.out("load", input=archive)
    assert f"Loaded image: {ref}" in loaded
    assert _inspect(dnode, ref)["Id"] == image_id
    # `docker save -o`, then `docker load -i`, through a file
    path = tmp_path / "busybox.tar"
    dnode.docker("save", "-o", str(path), ref)
    assert f"Loaded image: {ref}" in dnode.out("load", "-i", str(path))


def test_sdk_pull_list_get_tag_remove(dnode, images) -> None:
    client = dnode.sdk()
    repo, tag = images["busybox"].rsplit(":", 1)
    image = client.images.pull(repo, tag=tag)
    assert images["busybox"] in image.tags
    assert image.id in [i.id for i in client.images.list()]
    assert image.tag("shoaltest/sdk", "v1") is True
    assert client.images.get("shoaltest/sdk:v1").id == image.id
    client.images.remove("shoaltest/sdk:v1")
    assert "shoaltest/sdk:v1" not in client.images.get(image.id).tags
    pruned = client.images.prune()  # nothing dangling: nothing goes
    assert not pruned.get("ImagesDeleted")
    assert client.images.get(image.id).id == image.id


def test_pull_of_a_missing_image_fails_clearly(dnode, images) -> None:
    host = images["busybox"].split("/", 1)[0]
    proc = dnode.docker("pull", f"{host}/pods/nosuch:1", check=False)
    assert proc.returncode != 0
    assert b"nosuch" in proc.stderr and b"Error" in proc.stderr, proc.stderr
    bad = dnode.docker("pull", "UPPER/case", check=False)
    assert bad.returncode != 0 and b"invalid reference format" in bad.stderr


def test_rmi_nosuch_and_bad_params(dnode, images) -> None:
    proc = dnode.docker("rmi", "nosuch", check=False)
    assert proc.returncode != 0
    assert b"No such image: nosuch" in proc.stderr, proc.stderr
    code, body = _curl(dnode, "GET", "/images/json?filters=notjson")
    assert code == 400 and "filters" in json.loads(body)["message"]
    code, body = _curl(dnode, "GET", "/images/json?filters=%7B%22bogus%22%3A%5B%22x%22%5D%7D")
    assert code == 400 and json.loads(body)["message"] == "invalid filter 'bogus'"
    code, body = _curl(dnode, "GET", "/images/json?all=maybe")
    assert code == 400 and "all" in json.loads(body)["message"]
    code, body = _curl(dnode, "POST", "/images/create")
    assert code == 400 and "fromImage" in json.loads(body)["message"]
    code, body = _curl(dnode, "DELETE", "/images/nosuch?force=sure")
    assert code == 400
    code, body = _curl(dnode, "POST", f"/images/{images['busybox']}/tag?repo=BAD")
    assert code in (400, 404)


def test_save_nosuch_and_load_garbage_fail(dnode, images) -> None:
    proc = dnode.docker("save", "nosuch:1", check=False)
    assert proc.returncode != 0 and b"No such image: nosuch:1" in proc.stderr, proc.stderr
    proc = dnode.docker("load", input=b"not a tar at all" * 100, check=False)
    assert proc.returncode != 0 and b"invalid image archive" in proc.stderr, proc.stderr
    proc = dnode.docker("load", input=b"", check=False)
    assert proc.returncode != 0


async def test_rmi_of_an_image_a_container_uses_is_409_unless_forced(dnode, images) -> None:
    from shoal_docker_gateway.store.containers import ContainerRecord, Containers
    from shoal_docker_gateway.store.records import Records

    ref = images["busybox"]
    dnode.docker("pull", "-q", ref)
    image_id = _inspect(dnode, ref)["Id"]
    # The container record as the containers endpoints write it (a stopped container).
    records = Records(dnode.shoal.services.node.state_root / "docker-gateway" / "docker.db")
    await records.open()
    rec = ContainerRecord(id="ab" * 32, name="imgtest-user", image=ref, image_id=image_id,
                          config={}, state="exited")
    try:
        await Containers(records).insert(rec)
        proc = dnode.docker("rmi", ref, check=False)
        assert proc.returncode != 0
        assert b"must be forced" in proc.stderr and b"abababababab" in proc.stderr, proc.stderr
        assert _inspect(dnode, ref)["Id"] == image_id
        assert "Deleted: " + image_id in dnode.out("rmi", "-f", ref)
    finally:
        await Containers(records).delete(rec.id)
        await records.close()
    dnode.docker("pull", "-q", ref)
    assert _inspect(dnode, ref)["Id"] == image_id
