#!/usr/bin/env bash
# Installs everything Shoal needs on a Debian machine, as root, idempotently:
# the OCI runtime parts from apt and every Shoal package into a virtualenv.
#   deploy/setup.sh          runtime only
#   deploy/setup.sh --test   plus what the test suite needs
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SHOAL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
WITH_TEST=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1

APT_PACKAGES=(runc conmon containernetworking-plugins iproute2 iptables busybox-static catatonit
              ca-certificates python3 python3-venv util-linux hostname)
# The test suite runs a real OCI registry and a real Prometheus (tests/ops), compares
# unpacked trees with umoci (tests/snapshotter; it also builds a layout to import), and
# reads pushed images and exported archives with skopeo (and makes archives to import).
# The Docker gateway is tested with Debian's docker-compose (and its docker CLI, below).
(( WITH_TEST )) && APT_PACKAGES+=(docker-registry prometheus umoci skopeo docker-compose)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
  echo "setup: installing apt packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's docker CLI (20.10, API 1.41) for the Docker gateway's tests: taken out of the
# docker.io package, not installed, so no dockerd is ever set up or started.
DOCKER_CLI="$VENV/libexec/docker"
if (( WITH_TEST )) && [[ ! -x "$DOCKER_CLI" ]]; then
  deb_dir=$(mktemp -d)
  (cd "$deb_dir" && { apt-get download -qq docker.io 2>/dev/null ||
                      { apt-get update -qq && apt-get download -qq docker.io; }; } &&
   dpkg-deb -x docker.io_*.deb tree)
  install -D -m 0755 "$deb_dir/tree/usr/bin/docker" "$DOCKER_CLI"
  rm -rf "$deb_dir"
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Shoal needs Python >= 3.11 ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"

# Reinstall only when a package definition changed (editable installs track the code itself).
PACKAGES=(libs/common libs/cli services/puller services/snapshotter services/executor
          services/supervisor services/cri-gateway services/docker-gateway)
stamp_src=$(cd "$ROOT" && cat libs/*/pyproject.toml services/*/pyproject.toml requirements-test.txt | sha256sum | cut -c1-16)
stamp="$VENV/.shoal-setup-$stamp_src-$WITH_TEST"
if [[ ! -e "$stamp" ]]; then
  args=()
  for p in "${PACKAGES[@]}"; do args+=(-e "$ROOT/$p"); done
  (( WITH_TEST )) && args+=(-r "$ROOT/requirements-test.txt")
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${args[@]}"
  rm -f "$VENV"/.shoal-setup-*
  touch "$stamp"
fi
