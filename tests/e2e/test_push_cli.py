"""`shoal push IMAGE [TARGET]` as a user runs it: real CLI, real puller, real registries;
skopeo reads back what was pushed."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from pathlib import Path

import pytest
from support.images import LayerBuilder, build_image, push
from support.processes import SHOAL, ServiceSet
from support.registry import Registry

pytestmark = pytest.mark.e2e


def skopeo_digest(ref: str) -> str:
    raw = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                          f"docker://{ref}"], capture_output=True, timeout=120, check=True)
    return "sha256:" + hashlib.sha256(raw.stdout).hexdigest()


async def test_shoal_push(services: ServiceSet, registry: Registry, tmp_path: Path) -> None:
    image = build_image([LayerBuilder().file("a", b"a" * 5000).build(),
                         LayerBuilder().file("b", b"b" * 7000).build()], cmd=["a"])
    push(registry.url, "cli-push/src", "1", image)
    sp = services.start("puller")
    await asyncio.to_thread(services.wait_serving, sp)
    flags = services.node.flags()

    def shoal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SHOAL, *args, *flags], capture_output=True, text=True,
                              timeout=120)

    source = f"{registry.host}/cli-push/src:1"
    assert (await asyncio.to_thread(shoal, "pull", source)).returncode == 0
    short = [layer.digest.removeprefix("sha256:")[:12] for layer in image.layers]

    with Registry(tmp_path / "fresh") as fresh:
        out = await asyncio.to_thread(shoal, "push", source, f"{fresh.host}/team/app:1")
        assert out.returncode == 0, out.stderr
        for s in short:
            assert f"{s}: Pushed" in out.stdout
        assert f"Pushed: {fresh.host}/team/app:1" in out.stdout
        assert f"Digest: {image.digest}" in out.stdout
        assert "Blobs:  3 uploaded" in out.stdout
        assert skopeo_digest(f"{fresh.host}/team/app:1") == image.digest

    # Default TARGET: the image's own name, where everything already is.
    out = await asyncio.to_thread(shoal, "push", source)
    assert out.returncode == 0, out.stderr
    for s in short:
        assert f"{s}: Layer already exists" in out.stdout
    out = await asyncio.to_thread(shoal, "push", source, f"{registry.host}/cli-push/copy:2")
    assert out.returncode == 0, out.stderr
    for s in short:
        assert f"{s}: Mounted from another repository" in out.stdout
    assert skopeo_digest(f"{registry.host}/cli-push/copy:2") == image.digest

    out = await asyncio.to_thread(shoal, "push", f"{registry.host}/cli-push/absent:1")
    assert out.returncode == 1
    assert "shoal push: image " in out.stderr and "not found" in out.stderr
    out = await asyncio.to_thread(shoal, "push", source, "Bad//Ref")
    assert out.returncode == 1
    assert "shoal push: push target: invalid image reference 'Bad//Ref'" in out.stderr

    import crypt  # bcrypt through libxcrypt: what the registry's htpasswd needs

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    with Registry(tmp_path / "private", auth={"htpasswd": {
            "realm": "shoal-test", "path": str(htpasswd)}}) as private:
        target = f"{private.host}/private/app:1"
        out = await asyncio.to_thread(shoal, "push", source, target)
        assert out.returncode == 1
        assert "shoal push: push access denied for" in out.stderr
        assert "requires a username and password" in out.stderr
        out = await asyncio.to_thread(shoal, "push", source, target, "--user", "alice:s3cret")
        assert out.returncode == 0, out.stderr
        assert f"Digest: {image.digest}" in out.stdout

    readonly = {"storage": {"filesystem": {"rootdirectory": str(tmp_path / "ro")},
                            "maintenance": {"readonly": {"enabled": True}}}}
    with Registry(tmp_path / "ro", extra_config=readonly) as frozen:
        out = await asyncio.to_thread(shoal, "push", source, f"{frozen.host}/ro/app:1")
    assert out.returncode == 1
    assert "registry refused: HTTP 405 Method not allowed" in out.stderr
