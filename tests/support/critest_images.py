"""The images cri-tools' critest v1.26.1 pulls, rebuilt with this project's image builder.

critest's validation suite pulls `registry.k8s.io/e2e-test-images/...` and
`gcr.io/k8s-staging-cri-tools/...` images. Without network access to those registries (and
since critest v1.26.1's `-registry-prefix` drops tags), the conformance run in
docs/conformance.md pushes stand-ins built here to a local registry under the same
repository paths and tags, and points both runtimes' registry mirrors for `registry.k8s.io`
and `gcr.io` at it.

Each stand-in is built from a host busybox (+ catatonit for the pause image) and does what
the specs that use it check (cri-tools `pkg/validate/*.go`, `images/*/Dockerfile`):

- `e2e-test-images/busybox:1.29-2`: every applet of the host's busybox in /bin (hard
  links, as in the busybox image, so that masking /bin/ls masks only ls), plus the
  host's `pgrep` (procps) and `ipcs` (util-linux) with their libraries, which Debian's
  busybox lacks and specs run (`pgrep sleep`, `ipcs -m`); passwd/group as in the busybox
  image (root, www-data=33, nobody=65534, ...). `--busybox` picks the binary: Debian's
  busybox-static (the default, /bin/busybox) runs applets without exec ("prefer applets"),
  so `sh -c ls` ignores a masked /bin/ls and the MaskedPaths spec cannot pass with it; the
  binary of Debian's `busybox` package (which conflicts with busybox-static: extract it
  with `apt-get download busybox; dpkg-deb -x busybox_*.deb DIR`) execs them like the
  upstream image's.
- `e2e-test-images/nginx:1.14-2`, `k8s-staging-cri-tools/hostnet-nginx-amd64`: `nginx` is
  a shell script serving a "Welcome to nginx!" page with busybox httpd on port 80 (12003 for
  hostnet), under nginx's process name (`pidof nginx`), with its pid file
  (`/var/run/nginx.pid`) and a command line containing "master process".
- `e2e-test-images/httpd:2.4.39-4`: busybox httpd on port 80 that first logs Apache's
  `AH00094: Command line: 'httpd -D FOREGROUND'` on stderr, as the multi-container spec
  expects in its log.
- `e2e-test-images/nonewprivs:1.3`: a setuid-root `/usr/local/bin/nnp` printing
  `Effective uid: N` (a 159-byte static x86-64 program, see `nnp_elf`).
- `k8s-staging-cri-tools/test-image-*`: busybox with one marker file (or a USER) each, as
  `images/build` makes them: different tags of `test-image-tags` share one image,
  `test-image-1/2/3` and `test-image-tag:test`/`:all` differ.
- `pause:3.9`: catatonit, the sandbox image of both runtimes.

`test-image-digest` is pushed too, but the spec pulls it by the digest of the upstream
manifest (`sha256:9700f9a2...`), which no rebuilt image can have: that spec fails on any
runtime here.

Every image is a Docker manifest list with one linux/amd64 Docker manifest, like the
upstream multi-arch images.

Usage (from `tests/`)::

    ../.venv/bin/python -m support.critest_images http://127.0.0.1:5000
    ../.venv/bin/python -m support.critest_images --serve /tmp/critest-registry --port 5000

The second form starts Debian's docker-registry on that port, pushes, and serves until
Ctrl-C. Either prints the mirror configuration for Shoal and containerd.
"""

from __future__ import annotations

import argparse
import signal
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .images import (
    BUSYBOX_PATH,
    DEFAULT_PATH,
    Image,
    Index,
    Layer,
    LayerBuilder,
    build_image,
    build_index,
    elf_interpreter,
    pause_layer,
    push,
    shared_libraries,
)

E2E = "registry.k8s.io/e2e-test-images"
CRI_TOOLS = "gcr.io/k8s-staging-cri-tools"
MIRRORED_REGISTRIES = ("registry.k8s.io", "gcr.io")
PAUSE = "registry.k8s.io/pause:3.9"

# As in the busybox image (busybox:1.29's /etc/passwd and /etc/group).
PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
GROUP = """\
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
cdrom:x:11:
dialout:x:18:
floppy:x:19:
video:x:28:
audio:x:29:
tape:x:32:
www-data:x:33:
operator:x:37:
utmp:x:43:
plugdev:x:46:
staff:x:50:
lock:x:54:
netdev:x:82:
users:x:100:
nogroup:x:65534:
"""

# Host programs specs run that Debian's busybox has no applet for.
EXTRA_PROGRAMS = {"usr/bin/pgrep": "/usr/bin/pgrep", "usr/bin/ipcs": "/usr/bin/ipcs"}

NGINX_SCRIPT = """\
#!/bin/sh
# Stand-in for nginx (Shoal's critest images): busybox httpd serves /usr/share/nginx/html
# on $NGINX_PORT (80). The script keeps nginx's process name (pidof nginx), writes its pid
# file and re-executes itself so that its command line reads "master process".
if [ "$1" != "master process" ]; then
    exec /usr/sbin/nginx "master process" "$@"
fi
echo $$ > /var/run/nginx.pid
httpd -f -p "${NGINX_PORT:-80}" -h /usr/share/nginx/html &
child=$!
trap 'kill $child 2>/dev/null; wait $child; rm -f /var/run/nginx.pid; exit 0' TERM INT QUIT
wait $child
"""
NGINX_PAGE = """\
<!DOCTYPE html>
<html>
<head><title>Welcome to nginx!</title></head>
<body><h1>Welcome to nginx!</h1></body>
</html>
"""
HTTPD_SCRIPT = """\
#!/bin/sh
# Stand-in for Apache httpd (Shoal's critest images): logs what Apache logs at start, then
# serves /usr/local/apache2/htdocs on port 80 with busybox httpd.
echo "[core:notice] [pid $$] AH00094: Command line: 'httpd -D FOREGROUND'" >&2
exec httpd -f -p 80 -h /usr/local/apache2/htdocs
"""

# _start: geteuid(); format "Effective uid: <euid>\\n" backwards into a buffer after the
# prefix; write(1, ...) once (one write, so the log line is never split); exit(0).
# Assembled with GNU as from (Intel syntax):
#   mov eax,107; syscall; lea rdi,[rip+buf_end]; mov byte [rdi],10; mov rsi,rdi; mov ecx,10
#   1: xor edx,edx; div ecx; add dl,48; dec rsi; mov [rsi],dl; test eax,eax; jnz 1b
#   lea r8,[rip+prefix_end]; mov ecx,15
#   2: dec r8; dec rsi; mov al,[r8]; mov [rsi],al; dec ecx; jnz 2b
#   lea rdx,[rdi+1]; sub rdx,rsi; mov edi,1; mov eax,1; syscall; mov eax,60; xor edi,edi
#   syscall
#   prefix: .ascii "Effective uid: "; prefix_end: .space 47; buf_end: .byte 0
_NNP_CODE = bytes.fromhex(
    "b86b0000000f05488d3d90000000c6070a4889feb90a00000031d2f7f180c23048ffce881685c075f0"
    "4c8d053f000000b90f00000049ffc848ffce418a008806ffc975f1488d57014829f2bf01000000b801"
    "0000000f05b83c00000031ff0f05"
)


def nnp_elf() -> bytes:
    """A static x86-64 Linux executable printing `Effective uid: <geteuid()>`: what the
    nonewprivs image's `nnp` prints. One RWX PT_LOAD segment holds headers, code and the
    buffer; the code is position independent."""
    code = _NNP_CODE + b"Effective uid: " + bytes(48)
    assert len(code) == 0x60 + 15 + 48
    base, header_size = 0x400000, 64 + 56
    size = header_size + len(code)
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 0x3E, 1, base + header_size, 64, 0, 0,
                       64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0, base, base, size, size, 0x1000)
    return ehdr + phdr + code


def busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted(a for a in out.stdout.split() if a != "busybox" and "/" not in a)


def base_layer(busybox: Path = BUSYBOX_PATH) -> Layer:
    """The busybox image's root filesystem. Applets are hard links to /bin/busybox, as in
    the busybox image: a masked path (a bind mount of /dev/null on /bin/ls) then hides that
    applet only, where a symlink would lead the mount to busybox itself. Entries stay in
    insertion order so that each link follows its target."""
    b = LayerBuilder(sort=False)
    for d in ("bin", "dev", "etc", "home", "proc", "sys", "usr", "usr/bin", "usr/sbin",
              "usr/local", "usr/local/bin", "var", "var/run", "var/log", "var/www",
              "var/spool", "var/spool/mail"):
        b.dir(d)
    b.dir("root", mode=0o700)
    b.dir("tmp", mode=0o1777)
    add_host_programs(b, {"bin/busybox": str(busybox), **EXTRA_PROGRAMS})
    for applet in busybox_applets(busybox):
        b.hardlink(f"bin/{applet}", "bin/busybox", mode=0o755)
    b.file("etc/passwd", PASSWD)
    b.file("etc/group", GROUP)
    b.file("etc/shadow", "".join(f"{line.split(':')[0]}:*:10933:0:99999:7:::\n"
                                 for line in PASSWD.splitlines()), mode=0o600)
    return b.build()


def add_host_programs(b: LayerBuilder, programs: Mapping[str, str]) -> None:
    """Host programs (dest -> host path) with their loader and libraries, each library and
    directory added once (add_host_binary would repeat those shared by several)."""
    files: list[str] = []
    for dest, src in programs.items():
        b.host_file(dest, src, mode=0o755)
        interp = elf_interpreter(src)
        if interp is not None:
            files += [f for f in (interp, *shared_libraries(src)) if f not in files]
    for d in sorted({str(p) for f in files for p in Path(f).parents if str(p) != "/"}):
        b.dir(d)
    for f in files:
        b.host_file(f, f)


def marker_layer(*files: str) -> Layer:
    """`ADD <name> <name>` of empty files, as cri-tools' images/image-test does."""
    b = LayerBuilder()
    for name in files:
        b.file(name)
    return b.build()


def nginx_layer() -> Layer:
    return (LayerBuilder()
            .dir("usr/share/nginx").dir("usr/share/nginx/html")
            .file("usr/share/nginx/html/index.html", NGINX_PAGE)
            .file("usr/sbin/nginx", NGINX_SCRIPT, mode=0o755)
            .dir("var/log/nginx")
            .build())


def httpd_layer() -> Layer:
    return (LayerBuilder()
            .dir("usr/local/apache2").dir("usr/local/apache2/bin")
            .dir("usr/local/apache2/htdocs")
            .file("usr/local/apache2/htdocs/index.html",
                  "<html><body><h1>It works!</h1></body></html>\n")
            .file("usr/local/apache2/bin/httpd-foreground", HTTPD_SCRIPT, mode=0o755)
            .build())


def nonewprivs_layer() -> Layer:
    return LayerBuilder().file("usr/local/bin/nnp", nnp_elf(), mode=0o4755).build()


def predefined_group_layer() -> Layer:
    """`adduser -u 1000 -D default-user; addgroup -g 50000 group-defined-in-image;
    addgroup default-user group-defined-in-image` on top of the busybox files."""
    return (LayerBuilder()
            .dir("home/default-user", uid=1000, gid=1000)
            .file("etc/passwd", PASSWD + "default-user:x:1000:1000:Linux User,,,:"
                  "/home/default-user:/bin/sh\n")
            .file("etc/group", GROUP + "default-user:x:1000:\n"
                  "group-defined-in-image:x:50000:default-user\n")
            .build())


@dataclass(frozen=True)
class Target:
    """One image, published under every reference in `refs` (`host/repo:tag`)."""

    refs: tuple[str, ...]
    image: Image


def _image(layers: Iterable[Layer], **kw: object) -> Image:
    kw.setdefault("env", {"PATH": DEFAULT_PATH})
    return build_image(list(layers), schema="docker", **kw)  # type: ignore[arg-type]


def targets(busybox: Path = BUSYBOX_PATH) -> list[Target]:
    base = base_layer(busybox)
    busybox = _image([base], cmd=["sh"])
    nginx_cmd = {"cmd": ["nginx", "-g", "daemon off;"], "exposed_ports": [80],
                 "stop_signal": "SIGTERM"}
    out = [
        Target((f"{E2E}/busybox:1.29-2",), busybox),
        Target((f"{E2E}/nginx:1.14-2",), _image([base, nginx_layer()], **nginx_cmd)),
        Target((f"{CRI_TOOLS}/hostnet-nginx-amd64:latest",),
               _image([base, nginx_layer()], **{
                   **nginx_cmd, "exposed_ports": [12003],
                   "env": {"PATH": DEFAULT_PATH, "NGINX_PORT": "12003"}})),
        Target((f"{E2E}/httpd:2.4.39-4",),
               _image([base, httpd_layer()], cmd=["httpd-foreground"], exposed_ports=[80],
                      working_dir="/usr/local/apache2",
                      env={"PATH": "/usr/local/apache2/bin:" + DEFAULT_PATH})),
        Target((f"{E2E}/nonewprivs:1.3",),
               _image([base, nonewprivs_layer()], cmd=["/usr/local/bin/nnp"], user="1000")),
        Target((f"{CRI_TOOLS}/test-image-predefined-group:latest",),
               _image([base, predefined_group_layer()], cmd=["sh"], user="1000")),
        Target((PAUSE,), build_image([pause_layer()], entrypoint=["/catatonit", "-P"],
                                     schema="docker")),
    ]
    for name, user in (("user-uid", "1002"), ("user-username", "www-data"),
                       ("user-uid-group", "1003:1004"),
                       ("user-username-group", "www-data:1004")):
        out.append(Target((f"{CRI_TOOLS}/test-image-{name}:latest",),
                          _image([base], cmd=["sh"], user=user)))
    for name in ("test-image-1", "test-image-2", "test-image-3", "test-image-latest",
                 "test-image-digest"):
        out.append(Target((f"{CRI_TOOLS}/{name}:latest",),
                          _image([base, marker_layer(name)], cmd=["sh"])))
    out.append(Target(tuple(f"{CRI_TOOLS}/test-image-tags:{t}" for t in ("1", "2", "3")),
                      _image([base, marker_layer("same-image")], cmd=["sh"])))
    for tag in ("test", "all"):
        out.append(Target((f"{CRI_TOOLS}/test-image-tag:{tag}",),
                          _image([base, marker_layer(tag)], cmd=["sh"])))
    return out


def split_ref(ref: str) -> tuple[str, str, str]:
    """`host/repo:tag` -> (host, repo, tag)."""
    host, _, rest = ref.partition("/")
    repo, _, tag = rest.rpartition(":")
    return host, repo, tag


def publish(registry_url: str, items: Iterable[Target]) -> dict[str, str]:
    """Push each image as a one-platform Docker manifest list under every reference's
    repository and tag (the registry host is dropped: the mirror serves all of them).
    Returns reference -> pushed manifest list digest."""
    pushed: dict[str, str] = {}
    for target in items:
        index: Index = build_index([target.image], schema="docker")
        for ref in target.refs:
            _, repo, tag = split_ref(ref)
            pushed[ref] = push(registry_url, repo, tag, index)
    return pushed


def mirror_settings(registry_url: str) -> str:
    url = registry_url.rstrip("/")
    shoal = " ".join(f"--set 'services.puller.registries.\"{host}\".mirrors=[\"{url}\"]'"
                     for host in MIRRORED_REGISTRIES)
    ctrd = "\n".join(
        f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]\n'
        f'  endpoint = ["{url}"]' for host in MIRRORED_REGISTRIES)
    return (f"Shoal: {shoal} --set 'cri.sandbox_image=\"{PAUSE}\"'\n"
            f"containerd 1.6 (config.toml):\n{ctrd}\n"
            f'[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "{PAUSE}"')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m support.critest_images",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("registry_url", nargs="?", help="push to this registry (http://host:port)")
    parser.add_argument("--serve", metavar="DIR", type=Path,
                        help="start docker-registry with storage in DIR, push, serve until ^C")
    parser.add_argument("--port", type=int, default=None, help="with --serve: its port")
    parser.add_argument("--busybox", type=Path, default=BUSYBOX_PATH,
                        help=f"the busybox binary of the images (default {BUSYBOX_PATH})")
    args = parser.parse_args(argv)
    if (args.registry_url is None) == (args.serve is None):
        parser.error("give a registry URL or --serve DIR")
    items = targets(args.busybox)
    if args.serve is None:
        for ref, digest in publish(args.registry_url, items).items():
            print(f"{ref}  {digest}")
        print(mirror_settings(args.registry_url))
        return 0
    from .registry import Registry

    with Registry(args.serve, port=args.port) as registry:
        for ref, digest in publish(registry.url, items).items():
            print(f"{ref}  {digest}")
        print(mirror_settings(registry.url))
        print(f"serving on {registry.url}; Ctrl-C stops it", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
