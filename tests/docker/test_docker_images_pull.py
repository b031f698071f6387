"""`docker pull` in more detail through the docker CLI and SDK: credentials from
X-Registry-Auth (the CLI's config.json, the SDK's auth_config), the streamed messages per
layer, label filters and prune, rmi by id, and save/load of several images."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from support.docker import docker_node_fixture
from support.images import LayerBuilder, build_image, push
from support.registry import Registry
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("imgpull")


def _id(dnode, ref: str) -> str:
    return json.loads(dnode.out("image", "inspect", ref))[0]["Id"]


def test_pull_with_registry_credentials(dnode, tmp_path: Path) -> None:
    import crypt  # bcrypt through libxcrypt: what the registry's htpasswd needs

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    creds = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
    with Registry(tmp_path / "storage", auth={"htpasswd": {
            "realm": "shoal-test", "path": str(htpasswd)}}) as private:
        image = build_image([LayerBuilder().file("secret", b"private").build()], cmd=["x"])
        push(private.url, "private/img", "1", image, headers=creds)
        ref = f"{private.host}/private/img:1"
        refused = dnode.docker("pull", ref, check=False)
        assert refused.returncode != 0 and b"Error" in refused.stderr, refused.stderr
        # The CLI sends X-Registry-Auth from its config.json's entry for the registry.
        config = dnode.config_dir / "config.json"
        config.write_text(json.dumps({"auths": {private.host: {
            "auth": base64.b64encode(b"alice:s3cret").decode()}}}))
        try:
            out = dnode.out("pull", ref)
        finally:
            config.unlink()
        assert f"Status: Downloaded newer image for {ref}" in out
        assert _id(dnode, ref) == image.config_digest
        dnode.docker("rmi", ref)
        client = dnode.sdk()
        pulled = client.images.pull(f"{private.host}/private/img", tag="1",
                                    auth_config={"username": "alice", "password": "s3cret"})
        assert pulled.id == image.config_digest
        client.images.remove(ref)


def test_pull_stream_says_each_layer_then_digest(dnode, registry) -> None:
    layers = [LayerBuilder().file(f"f{i}", bytes([i]) * (200_000 + i)).build() for i in range(3)]
    image = build_image(layers, cmd=["sh"], labels={"shoal.test": "layers"})
    push(registry.url, "dtest/layers", "3", image)
    repo = f"{registry.host}/dtest/layers"
    client = dnode.sdk()
    messages = list(client.api.pull(repo, tag="3", stream=True, decode=True))
    assert messages[0] == {"status": "Pulling from dtest/layers", "id": "3"}
    shorts = {layer.digest[7:19] for layer in image.layers}
    complete = {m["id"] for m in messages if m.get("status") == "Pull complete"}
    assert complete == shorts
    for m in messages:
        if m.get("status") == "Downloading":
            assert 0 <= m["progressDetail"]["current"] <= m["progressDetail"]["total"]
    assert messages[-2]["status"].startswith("Digest: sha256:")
    assert messages[-1] == {"status": f"Status: Downloaded newer image for {repo}:3"}
    assert not any("error" in m for m in messages)

    listed = dnode.out("images", "--format", "{{.Repository}}:{{.Tag}}",
                       "--filter", "label=shoal.test=layers")
    assert listed == f"{repo}:3"
    assert dnode.out("images", "-q", "--filter", "label=shoal.test=other") == ""
    inspect = json.loads(dnode.out("image", "inspect", f"{repo}:3"))[0]
    assert inspect["Config"]["Labels"] == {"shoal.test": "layers"}
    assert len(inspect["RootFS"]["Layers"]) == 3
    out = dnode.out("image", "prune", "-a", "-f", "--filter", "label=shoal.test=layers")
    assert f"deleted: {image.config_digest}" in out.lower(), out
    assert dnode.docker("image", "inspect", f"{repo}:3", check=False).returncode != 0


def test_rmi_by_id_of_an_image_in_two_repositories_needs_force(dnode, images) -> None:
    ref = images["busybox"]
    dnode.docker("pull", "-q", ref)
    image_id = _id(dnode, ref)
    dnode.docker("tag", ref, "otherrepo/bb:1")
    proc = dnode.docker("rmi", image_id[7:19], check=False)
    assert proc.returncode != 0 and b"referenced in multiple repositories" in proc.stderr
    out = dnode.out("rmi", "-f", image_id[7:19])
    assert "Untagged: otherrepo/bb:1" in out and f"Untagged: {ref}" in out
    assert f"Deleted: {image_id}" in out
    assert not re.search(image_id[7:19], dnode.out("images", "-q"))


def test_save_two_images_then_load_both(dnode, images, registry) -> None:
    ref = images["busybox"]
    other = build_image([LayerBuilder().file("other", b"x" * 5000).build()], cmd=["x"])
    push(registry.url, "dtest/other", "1", other)
    other_ref = f"{registry.host}/dtest/other:1"
    dnode.docker("pull", "-q", ref)
    dnode.docker("pull", "-q", other_ref)
    ids = {ref: _id(dnode, ref), other_ref: _id(dnode, other_ref)}
    archive = dnode.docker("save", ref, other_ref).stdout
    dnode.docker("rmi", ref, other_ref)
    loaded = dnode.out("load", input=archive)
    assert f"Loaded image: {ref}" in loaded and f"Loaded image: {other_ref}" in loaded
    assert {r: _id(dnode, r) for r in ids} == ids
    dnode.docker("rmi", other_ref)


def test_push_then_pull_back(dnode, images, registry) -> None:
    ref = images["busybox"]
    dnode.docker("pull", "-q", ref)
    image_id = _id(dnode, ref)
    target = f"{registry.host}/dtest/pushed:1"
    dnode.docker("tag", ref, target)
    out = dnode.out("push", target)
    assert f"The push refers to repository [{registry.host}/dtest/pushed]" in out
    assert re.search(r"^[0-9a-f]{12}: (Pushed|Layer already exists|Mounted from .*)$", out,
                     re.M), out
    digest = re.search(r"^1: digest: (sha256:[0-9a-f]{64}) size: \d+$", out, re.M)
    assert digest, out
    dnode.docker("rmi", target)
    pulled = dnode.out("pull", target)
    assert f"Digest: {digest.group(1)}" in pulled
    assert _id(dnode, target) == image_id
    dnode.docker("rmi", target)
    missing = dnode.docker("push", f"{registry.host}/dtest/nothere:1", check=False)
    assert missing.returncode != 0
    assert b"An image does not exist locally with the tag" in missing.stderr, missing.stderr
