"""NATS subject layout (DESIGN.md): commands, health and events, all scoped by node."""

from __future__ import annotations

import re

PREFIX = "shoal.v1"
EVENTS_STREAM_SUBJECTS = [f"{PREFIX}.*.events.>"]

# A node id and a service token must each be a single NATS subject token.
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def command(node: str, service: str, verb: str) -> str:
    """`shoal.v1.<node>.<service>.<verb>`; a verb may itself be dotted (`sandbox.create`)."""
    return f"{PREFIX}.{node}.{service}.{verb}"


def started(node: str, service: str) -> str:
    """`shoal.v1.<node>.started.<service>`: a replica announces it serves (core NATS, no
    body); `service` "*" is the filter every bus subscribes to."""
    return f"{PREFIX}.{node}.started.{service}"


def health(node: str, service: str) -> str:
    return command(node, service, "health")


def encode_namespace(namespace: str) -> str:
    """Namespaces contain dots (`k8s.io`), which NATS treats as token separators, so they are
    percent-escaped into one token. Reversible, so a subscriber can recover the name."""
    return namespace.replace("%", "%25").replace(".", "%2E").replace("*", "%2A").replace(
        ">", "%3E").replace(" ", "%20")


def decode_namespace(token: str) -> str:
    for escaped, plain in (("%2E", "."), ("%2A", "*"), ("%3E", ">"), ("%20", " "), ("%25", "%")):
        token = token.replace(escaped, plain)
    return token


def event(node: str, namespace: str, topic: str) -> str:
    """`shoal.v1.<node>.events.<namespace>.<topic>` (topic dotted as containerd names it)."""
    return f"{PREFIX}.{node}.events.{encode_namespace(namespace)}.{topic}"


def event_filter(node: str = "*", namespace: str | None = None, topic: str | None = None) -> str:
    ns = encode_namespace(namespace) if namespace else "*"
    return f"{PREFIX}.{node}.events.{ns}.{topic or '>'}"


def parse_event(subject: str) -> tuple[str, str, str]:
    """Split an event subject into (node, namespace, topic)."""
    parts = subject.split(".")
    if len(parts) < 6 or f"{parts[0]}.{parts[1]}" != PREFIX or parts[3] != "events":
        raise ValueError(f"not a Shoal event subject: {subject}")
    return parts[2], decode_namespace(parts[4]), ".".join(parts[5:])
