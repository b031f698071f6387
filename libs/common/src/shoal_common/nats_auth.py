"""The secured bus: one NATS user per service, each allowed only its own subjects.

A service may serve only its own command subjects and publish only its own events; only the
gateway (and the admin user of the CLI and launcher) may send commands to the executor and
supervisor; only the snapshotter and the gateway may read the events stream. Replies travel
on per-user inbox prefixes (`_INBOX_<user>.`), so no user can read another's replies.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from pathlib import Path
from typing import Any

from shoal_common.config import NatsConfig
from shoal_common.errors import Unavailable
from shoal_common.fs import private_dir

ADMIN = "admin"
SERVICE_USERS = ("puller", "snapshotter", "executor", "supervisor", "cri-gateway",
                 "docker-gateway")
GATEWAYS = ("cri-gateway", "docker-gateway")
JS_API = "$JS.API"


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}" if user else "_INBOX"


def connect_options(cfg: NatsConfig) -> dict[str, Any]:
    """nats-py's connect() arguments for this process's user and TLS settings."""
    options: dict[str, Any] = {}
    if cfg.user:
        try:
            password = Path(cfg.password_file).read_text().strip() if cfg.password_file else ""
        except OSError as exc:
            raise Unavailable(f"NATS password file {cfg.password_file}: "
                              f"{exc.strerror}") from None
        options = {"user": cfg.user, "password": password,
                   "inbox_prefix": inbox_prefix(cfg.user)}
    if cfg.tls_ca:
        context = ssl.create_default_context(cafile=cfg.tls_ca)
        if cfg.tls_cert:
            context.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
        options["tls"] = context
    return options


def _perms(node: str, stream: str, user: str) -> dict[str, Any]:
    n = node
    own = {"puller": "images", "snapshotter": "snapshots", "executor": "tasks",
           "supervisor": "monitor", "cri-gateway": "cri", "docker-gateway": "docker"}[user]
    events = {"puller": ["images", "content"], "snapshotter": ["snapshots"],
              "executor": [], "supervisor": ["tasks"], "cri-gateway": [],
              "docker-gateway": ["docker"]}[user]
    publish = [f"shoal.v1.{n}.events.*.{topic}.>" for topic in events]
    publish += [f"shoal.v1.{n}.started.{own}"]  # "I serve": callers resend what was lost
    # Every service makes sure the events stream exists.
    publish += [f"{JS_API}.STREAM.INFO.{stream}", f"{JS_API}.STREAM.CREATE.{stream}"]
    if user == "snapshotter":
        publish += [f"shoal.v1.{n}.images.content.>"]  # reads blobs from the puller
        durable = f"snapshotter-{n}"
        publish += [f"{JS_API}.CONSUMER.*.{stream}.{durable}",
                    f"{JS_API}.CONSUMER.*.{stream}.{durable}.>",
                    f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}",
                    f"$JS.ACK.{stream}.{durable}.>"]
    if user == "executor":
        publish += [f"shoal.v1.{n}.monitor.>"]
    if user in GATEWAYS:
        # Commands to the services on the container path, and their own ordered consumers
        # of events; they publish no event another service acts on (a forged images.delete
        # was acted on): the Docker gateway's own `docker.*` events only.
        publish += [f"shoal.v1.{n}.{svc}.>" for svc in ("images", "snapshots", "tasks",
                                                          "monitor")]
        publish += [f"{JS_API}.STREAM.NAMES", f"{JS_API}.CONSUMER.CREATE.{stream}",
                    f"{JS_API}.CONSUMER.CREATE.{stream}.>",
                    f"{JS_API}.CONSUMER.DELETE.{stream}.>", f"{JS_API}.CONSUMER.INFO.{stream}.>",
                    "$JS.FC.>", "$JS.ACK.>"]
    if user == "docker-gateway":
        # Its durable consumer of task exits (Docker's `die` events, none lost while away).
        publish += [f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.docker-gateway-{n}"]
    subscribe = [f"shoal.v1.{n}.{own}.>", f"shoal.v1.{n}.started.*", f"{inbox_prefix(user)}.>"]
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe},
            "allow_responses": True}


def server_config(*, listen_host: str, port: int, store_dir: str, server_name: str,
                  node: str, stream: str, passwords: dict[str, str] | None,
                  tls_cert: str = "", tls_key: str = "") -> str:
    """A nats-server config (JSON is valid nats-server config syntax)."""
    conf: dict[str, Any] = {
        "server_name": server_name, "host": listen_host, "port": port,
        "jetstream": {"store_dir": store_dir},
    }
    if tls_cert and tls_key:
        conf["tls"] = {"cert_file": tls_cert, "key_file": tls_key}
    if passwords is not None:
        users: list[dict[str, Any]] = [{"user": ADMIN, "password": passwords[ADMIN]}]  # everything
        users += [{"user": u, "password": passwords[u], "permissions": _perms(node, stream, u)}
                  for u in SERVICE_USERS]
        conf["authorization"] = {"users": users}
    return json.dumps(conf, indent=2) + "\n"


def ensure_passwords(auth_dir: Path) -> dict[str, str]:
    """Random passwords per user, created once and kept (root-only files)."""
    private_dir(auth_dir)
    out = {}
    for user in (ADMIN, *SERVICE_USERS):
        path = auth_dir / f"{user}.password"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24))
        out[user] = path.read_text().strip()
    return out


def password_file(auth_dir: Path, user: str) -> Path:
    return auth_dir / f"{user}.password"
