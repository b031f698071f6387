"""`shoal push IMAGE [TARGET]`: an image from the puller's store to a registry, with a line
per layer as `shoal pull` draws them (redrawn on a terminal, state changes elsewhere)."""

from __future__ import annotations

import sys
import uuid

from shoal_common.bus import Bus
from shoal_common.clients import ImagesClient
from shoal_common.config import Config
from shoal_common.errors import ShoalError
from shoal_common.messages.push import PushProgress, PushReply, PushRequest

from shoal_cli.images import ProgressView, registry_auth, showing

PUSH_TIMEOUT = 3600.0
LABELS = {"waiting": "Waiting", "pushing": "Pushing", "exists": "Layer already exists",
          "mounted": "Mounted from another repository", "done": "Pushed"}
OUTCOMES = {"exists": "already there", "mounted": "mounted", "uploaded": "uploaded"}


class PushView(ProgressView):
    labels = LABELS
    moving = "pushing"


async def push(config: Config, bus: Bus, image: str, target: str, namespace: str,
               user: str) -> int:
    push_id = uuid.uuid4().hex
    try:
        async with showing(bus, config, namespace, PushProgress,
                           lambda e: e.push_id == push_id, PushView(sys.stdout)):
            reply = await ImagesClient(bus, namespace=namespace).push(
                PushRequest(ref=image, target=target, push_id=push_id,
                            auth=registry_auth(user)), timeout=PUSH_TIMEOUT)
    except ShoalError as exc:
        print(f"shoal push: {_explain(exc)}", file=sys.stderr)
        return 1
    _summary(reply)
    return 0


def _explain(exc: ShoalError) -> str:
    """The message, and the registry's status and error code when it refused."""
    status, code = exc.details.get("http_status"), exc.details.get("registry_code")
    if status and f"HTTP {status}" not in exc.message:
        return f"{exc.message} (HTTP {status}{f' {code}' if code else ''})"
    return exc.message


def _summary(reply: PushReply) -> None:
    counts: dict[str, int] = {}
    for blob in reply.blobs:
        counts[blob.outcome] = counts.get(blob.outcome, 0) + 1
    if reply.note:
        print(f"Note:   {reply.note}")
    print(f"Pushed: {reply.target}")
    print(f"Digest: {reply.digest}")
    print("Blobs:  " + ", ".join(f"{n} {OUTCOMES.get(outcome, outcome)}"
                                 for outcome, n in sorted(counts.items())))
