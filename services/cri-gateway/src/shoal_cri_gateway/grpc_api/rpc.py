"""What every CRI RPC shares: trace id, logging, metrics, and ShoalError → gRPC status."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from prometheus_client import Counter, Histogram
from shoal_common.errors import GRPC_STATUS, ShoalError
from shoal_common.metrics import LATENCY_BUCKETS
from shoal_common.tracing import bind_trace, new_trace_id

from shoal_cri_gateway.domain.namespaces import METADATA_KEY, namespace_from

log = structlog.get_logger("shoal.cri")

CRI_REQUESTS = Counter("shoal_cri_requests_total", "CRI RPCs handled, by RPC and gRPC code.",
                       ["rpc", "code"])
CRI_SECONDS = Histogram("shoal_cri_request_seconds", "CRI RPC latency, by RPC.", ["rpc"],
                        buckets=LATENCY_BUCKETS)

# Clients may pass their own trace id; it is always echoed back in the initial metadata.
TRACE_METADATA = "shoal-trace-id"

# kubelet polls these every few seconds; like containerd, log them at debug only.
POLLING_RPCS = frozenset({
    "Version", "Status", "ListPodSandbox", "PodSandboxStatus", "ListContainers",
    "ContainerStatus", "ListImages", "ImageStatus", "ImageFsInfo", "ContainerStats",
    "ListContainerStats", "PodSandboxStats", "ListPodSandboxStats", "ListMetricDescriptors",
    "ListPodSandboxMetrics", "RuntimeConfig",
})

# An error echoes parts of the request (a 1 MB image reference would overflow the client's
# metadata limit, 8 KiB in grpc-go): keep the message well under it.
MAX_MESSAGE = 2048


def bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    return message[:MAX_MESSAGE - 40] + f"... ({len(message)} characters in all)"


def namespace_of(context: grpc.aio.ServicerContext) -> str:
    """The Shoal namespace the call's metadata names (`shoal-namespace`; none: k8s.io, so
    kubelet and crictl are unchanged). A bad name is INVALID_ARGUMENT."""
    value = None
    for key, item in context.invocation_metadata() or ():
        if key == METADATA_KEY:
            value = item
    ns = namespace_from(value)
    structlog.contextvars.bind_contextvars(namespace=ns)
    return ns


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Method = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def rpc(fn: Method[Req, Resp]) -> Method[Req, Resp]:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        metadata = dict(context.invocation_metadata() or ())
        trace_id = str(metadata.get(TRACE_METADATA) or new_trace_id())
        bind_trace(trace_id, rpc=name)
        await context.send_initial_metadata(((TRACE_METADATA, trace_id),))
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await fn(self, request, context)
        except ShoalError as exc:
            code = grpc.StatusCode[GRPC_STATUS[exc.code]]
            message = bounded(exc.message)
            log.info("rpc failed", code=code.name, error=message)
            await context.abort(code, message)
            raise  # unreachable: abort raises
        except NotImplementedError as exc:
            code = grpc.StatusCode.UNIMPLEMENTED
            await context.abort(code, str(exc))
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("rpc crashed")
            await context.abort(code, bounded(f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            elapsed = time.perf_counter() - started
            CRI_SECONDS.labels(name).observe(elapsed)
            CRI_REQUESTS.labels(name, code.name).inc()
            (log.debug if name in POLLING_RPCS else log.info)(
                "rpc", code=code.name, ms=round(elapsed * 1000, 2))

    return wrapper
