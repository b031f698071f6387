"""The CRI client side the `shoal run/ps/pods/...` commands share: the connection to Shoal's
CRI socket, the error explained to the user, and finding a container or pod by id prefix.

Every call carries the Shoal namespace (`shoal -n NAME`, default k8s.io, kubelet's) in the
gRPC metadata key `shoal-namespace`: the gateway shows and acts on that namespace only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

from shoal_cli.failures import CliError, each

CONNECT_TIMEOUT = 5.0
NAMESPACE_METADATA = "shoal-namespace"  # the gateway's (shoal_cri_gateway.domain.namespaces)

# Re-exported: the pod commands take them from here with the connection.
__all__ = ["NAMESPACE_METADATA", "CliError", "connect", "each", "namespaced_channel"]




class Cri:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.runtime = cri_grpc.RuntimeServiceStub(channel)
        self.images = cri_grpc.ImageServiceStub(channel)


def _with_namespace(details: Any, namespace: str) -> Any:
    """The call's details with the namespace added to its metadata."""
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[NAMESPACE_METADATA] = namespace
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                      details.credentials, details.wait_for_ready)


class _Namespaced:
    """Adds the namespace to every call of one kind (gRPC takes an interceptor per kind)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    async def _intercept(self, continuation: Callable[..., Any], client_call_details: Any,
                         request: Any) -> Any:
        return await continuation(_with_namespace(client_call_details, self.namespace),
                                  request)


class _Unary(_Namespaced, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _Namespaced._intercept


class _Stream(_Namespaced, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _Namespaced._intercept


def namespaced_channel(socket_path: str, namespace: str) -> grpc.aio.Channel:
    """A channel to the CRI socket whose every call carries `namespace` (it connects on
    first use, so the gateway need not be up yet)."""
    interceptors: list[Any] = [_Unary(namespace), _Stream(namespace)]  # the stubs ask a cast
    return grpc.aio.insecure_channel(f"unix://{socket_path}", interceptors=interceptors)


@asynccontextmanager
async def connect(socket_path: str, namespace: str) -> AsyncIterator[Cri]:
    # A plain connect first: gRPC would only time out, where the errno says what is wrong.
    hint = "start it with `shoal up`, or point --run-root/--config at its socket"
    try:
        _, writer = await asyncio.open_unix_connection(socket_path)
        writer.close()
    except (FileNotFoundError, NotADirectoryError):
        raise CliError(f"Shoal is not running: no CRI socket at {socket_path} "
                       f"({hint})") from None
    except ConnectionRefusedError:
        raise CliError(f"Shoal is not running: nothing listens on {socket_path} "
                       f"({hint})") from None
    except PermissionError:
        raise CliError(f"no permission to use {socket_path} (it is root's)") from None
    async with namespaced_channel(socket_path, namespace) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise CliError(f"Shoal is not answering on {socket_path} (is `shoal up` "
                           "running?)") from None
        yield Cri(channel)


async def resolve(api: Cri, ident: str) -> cri.Container | cri.PodSandbox:
    """The one container or pod whose id is `ident` or starts with it."""
    if not ident:
        raise CliError("empty id")
    ctrs = (await api.runtime.ListContainers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(id=ident)))).containers
    pods = (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest(
        filter=cri.PodSandboxFilter(id=ident)))).items
    found: list[cri.Container | cri.PodSandbox] = [*ctrs, *pods]
    exact = [x for x in found if x.id == ident]
    if exact:
        return exact[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise CliError(f"no container or pod sandbox with id {ident!r}")
    raise CliError(f"id prefix {ident!r} is ambiguous ({len(found)} containers and pods "
                   "match): give more of it")


async def container_status(api: Cri, ident: str, verbose: bool = False
                           ) -> cri.ContainerStatusResponse:
    return await api.runtime.ContainerStatus(cri.ContainerStatusRequest(
        container_id=ident, verbose=verbose))


async def stop_container(api: Cri, container_id: str, timeout: int) -> None:
    await api.runtime.StopContainer(cri.StopContainerRequest(
        container_id=container_id, timeout=timeout))


def exited(state: int) -> bool:
    return state == cri.CONTAINER_EXITED


def exit_status(code: int) -> int:
    """A container's exit code as the CLI's own (a process exit status is 0..255)."""
    return min(max(code, 0), 255)
