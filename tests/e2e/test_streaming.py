"""The CRI streaming server end to end: Exec, Attach and PortForward URLs from the RPCs,
driven over SPDY/3.1 (a client of the tests' own, tests/support/spdy_client.py) and over
WebSocket (aiohttp's client), against real containers in a real pod."""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from support.images import busybox_image, pause_image, push
from support.processes import Node, ServiceSet, pids_mentioning
from support.registry import Registry
from support.spdy_client import ClientStream, SpdyClient, UpgradeFailed

pytestmark = pytest.mark.e2e
_subnets = itertools.count(120)
SERVICES = ("puller", "snapshotter", "executor", "supervisor", "cri-gateway")
V4, V3, V2, V1 = "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"
V5 = "v5.channel.k8s.io"
SUCCESS = b'{"metadata":{},"status":"Success"}'
# WebSocket channels of the remote command protocol.
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


@dataclass
class StreamNode:
    runtime: cri_grpc.RuntimeServiceStub
    pod: str
    pod_config: cri.PodSandboxConfig
    busybox: str
    ids: list[str] = field(default_factory=list)

    async def run(self, name: str, *command: str, **kw: object) -> str:
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                     image=cri.ImageSpec(image=self.busybox),
                                     command=list(command), **kw)  # type: ignore[arg-type]
        cid = (await self.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=self.pod, sandbox_config=self.pod_config,
            config=config))).container_id
        self.ids.append(cid)
        await self.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        return cid

    async def exec_url(self, cid: str, *cmd: str, stdin: bool = False, tty: bool = False,
                       stderr: bool = True) -> str:
        return (await self.runtime.Exec(cri.ExecRequest(
            container_id=cid, cmd=list(cmd), stdin=stdin, stdout=True,
            stderr=stderr and not tty, tty=tty))).url

    async def exec(self, cid: str, *cmd: str) -> cri.ExecSyncResponse:
        return await self.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=list(cmd),
                                                               timeout=10))

    async def portforward_url(self, *ports: int) -> str:
        return (await self.runtime.PortForward(cri.PortForwardRequest(
            pod_sandbox_id=self.pod, port=list(ports)))).url


@pytest.fixture(scope="module")
async def node(nats_url: str, registry: Registry,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[StreamNode]:
    """One Shoal node, one pod, for the whole module (starting services is the slow part)."""
    push(registry.url, "streaming/pause", "1", pause_image())
    push(registry.url, "streaming/busybox", "1", busybox_image())
    busybox = f"{registry.host}/streaming/busybox:1"
    n = next(_subnets)
    root = tmp_path_factory.mktemp("streaming")
    services = ServiceSet(Node(f"stream{n}", nats_url, root))
    extra = ["--set", f'cri.sandbox_image="{registry.host}/streaming/pause:1"',
             "--set", f'services.executor.pod_subnet="10.{n}.0.0/24"',
             "--set", f'services.executor.cni_bridge="shoals{n}"']
    try:
        for sp in [services.start(name, extra=extra) for name in SERVICES]:
            await asyncio.to_thread(services.wait_serving, sp)
        async with grpc.aio.insecure_channel(f"unix://{services.node.cri_socket}") as channel:
            runtime = cri_grpc.RuntimeServiceStub(channel)
            await cri_grpc.ImageServiceStub(channel).PullImage(cri.PullImageRequest(
                image=cri.ImageSpec(image=busybox)))
            config = cri.PodSandboxConfig(
                metadata=cri.PodSandboxMetadata(name="streams", uid=uuid.uuid4().hex,
                                                namespace="default"), hostname="streams")
            pod = (await runtime.RunPodSandbox(cri.RunPodSandboxRequest(
                config=config))).pod_sandbox_id
            api = StreamNode(runtime, pod, config, busybox, [pod])
            yield api
            for item in (await runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items:
                await runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=item.id))
                await runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(
                    pod_sandbox_id=item.id))
        # Nothing is left: mounts, monitors (exec sessions' too), network namespaces.
        mounts = Path("/proc/self/mounts").read_text()
        assert str(root) not in mounts
        conmons = [p for p in pids_mentioning(str(root))
                   if b"conmon" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert conmons == []
        for made in api.ids:
            assert not Path(f"/var/run/netns/shoal-{made[:32]}").exists()
        assert list((root / "run" / "supervisor" / "attach").iterdir()) == []
    finally:
        await asyncio.to_thread(services.stop_all)
        subprocess.run(["ip", "link", "delete", f"shoals{n}"], capture_output=True)


@pytest.fixture(scope="module")
async def sleeper(node: StreamNode) -> str:
    return await node.run("sleeper", "sleep", "3600")


async def spdy_exec(url: str, *, protocols: list[str], stdin: bytes | None = None,
                    stderr: bool = True, resize: ClientStream | None = None
                    ) -> tuple[bytes, bytes, bytes, SpdyClient]:
    """client-go's order: error stream first, then stdin, stdout, stderr."""
    client = await SpdyClient.connect(url, protocols)
    error = await client.open_stream({"streamType": "error"})
    send = await client.open_stream({"streamType": "stdin"}) if stdin is not None else None
    out = await client.open_stream({"streamType": "stdout"})
    err = await client.open_stream({"streamType": "stderr"}) if stderr else None
    if send is not None:
        await send.send(stdin or b"")
        await send.close()
    results = await asyncio.gather(out.read_all(), err.read_all() if err else _empty(),
                                   error.read_all())
    return results[0], results[1], results[2], client


async def _empty() -> bytes:
    return b""


async def test_exec_over_spdy(node: StreamNode, sleeper: str) -> None:
    url = await node.exec_url(sleeper, "cat", stdin=True)
    assert url.startswith("http://127.0.0.1:") and "/exec/" in url
    out, err, status, client = await spdy_exec(url, protocols=[V4, V3, V2, V1],
                                               stdin=b"hello\nfrom stdin")
    assert client.protocol == V4
    assert (out, err, status) == (b"hello\nfrom stdin", b"", SUCCESS)
    # A clean GOAWAY follows the status; the client may see the close first under load.
    assert client.goaway in (None, (client.last_stream_id, 0))
    await client.close()

    url = await node.exec_url(sleeper, "sh", "-c", "echo out; echo err >&2; exit 3")
    out, err, status, client = await spdy_exec(url, protocols=[V4])
    await client.close()
    assert (out, err) == (b"out\n", b"err\n")
    failure = json.loads(status)
    assert failure["status"] == "Failure" and failure["reason"] == "NonZeroExitCode"
    assert failure["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]

    # Before v4 the error stream holds only a failure's text.
    url = await node.exec_url(sleeper, "sh", "-c", "exit 4")
    _, _, status, client = await spdy_exec(url, protocols=[V2])
    await client.close()
    assert client.protocol == V2 and b"exit code 4" in status and not status.startswith(b"{")
    url = await node.exec_url(sleeper, "true")
    _, _, status, client = await spdy_exec(url, protocols=[V1])
    await client.close()
    assert status == b""
    # A command that cannot start is an internal error on the error stream.
    url = await node.exec_url(sleeper, "no-such-command")
    _, _, status, client = await spdy_exec(url, protocols=[V4])
    await client.close()
    assert json.loads(status)["reason"] == "InternalError"
    assert "executable file not found" in json.loads(status)["message"]

    # A client that leaves mid-command takes its process along (nobody could see it).
    url = await node.exec_url(sleeper, "sleep", "1234", stdin=True)
    client = await SpdyClient.connect(url, [V4])
    for kind in ("error", "stdin", "stdout", "stderr"):
        await client.open_stream({"streamType": kind})
    for _ in range(200):
        if b"sleep 1234" in (await node.exec(sleeper, "ps", "-o", "args")).stdout:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the exec did not start")
    await client.close()
    for _ in range(100):
        if b"sleep 1234" not in (await node.exec(sleeper, "ps", "-o", "args")).stdout:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the exec outlived its client")

    # A large output crosses many frames and more than the initial 64 KiB window.
    url = await node.exec_url(sleeper, "sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x")
    out, _, status, client = await spdy_exec(url, protocols=[V4])
    await client.close()
    assert (len(out), set(out), status) == (300000, {ord("x")}, SUCCESS)


async def wait_for_size(stream: ClientStream, size: str) -> None:
    await stream.read_until(f"size {size}".encode())


async def test_tty_exec_with_resize_over_spdy(node: StreamNode, sleeper: str) -> None:
    script = ('for want in "30 100" "40 120"; do while [ "$(stty size 2>/dev/null)" != '
              '"$want" ]; do sleep 0.05; done; echo "size $(stty size)"; done')
    url = await node.exec_url(sleeper, "sh", "-c", script, stdin=True, tty=True)
    client = await SpdyClient.connect(url, [V4])
    error, stdin, out, resize = await client.open_streams("error", "stdin", "stdout", "resize")
    await resize.send(b'{"Width":100,"Height":30}\n')
    await out.read_until(b"size 30 100")
    await client.ping(7)  # the server echoes the client's pings
    await resize.send(b'{"Width":120,')  # a message may be split anyhow
    await resize.send(b'"Height":40}\n')
    rest = await out.read_all()
    assert b"size 40 120\r\n" in rest  # a terminal: CRLF
    assert await error.read_all() == SUCCESS
    await stdin.close()
    await client.close()


async def ws_exec(url: str, protocol: str, *, send: tuple[bytes, ...] = (),
                  ) -> tuple[dict[int, bytes], aiohttp.ClientWebSocketResponse]:
    """Run a remote command over WebSocket: send `send` (already channel-framed), collect
    everything per channel until the server closes."""
    got: dict[int, bytes] = {}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http://", "ws://"),
                                      protocols=(protocol,)) as ws:
            assert ws.protocol == protocol
            for message in send:
                await ws.send_bytes(message)
            async with asyncio.timeout(20):
                async for msg in ws:
                    assert msg.type == aiohttp.WSMsgType.BINARY
                    got[msg.data[0]] = got.get(msg.data[0], b"") + msg.data[1:]
    return got, ws


async def test_exec_over_websocket(node: StreamNode, sleeper: str) -> None:
    # v5: the client closes stdin with a message on channel 255.
    url = await node.exec_url(sleeper, "cat", stdin=True)
    got, _ = await ws_exec(url, "v5.channel.k8s.io",
                           send=(bytes([STDIN]) + b"over ", bytes([STDIN]) + b"websocket",
                                 bytes([CLOSE, STDIN])))
    assert got[STDOUT] == b"over websocket" and got[ERROR] == SUCCESS
    # v4: stdin cannot be closed, so the command stops by itself.
    url = await node.exec_url(sleeper, "sh", "-c", "read line; echo got $line; echo e >&2; "
                              "exit 2", stdin=True)
    got, _ = await ws_exec(url, V4, send=(bytes([STDIN]) + b"ping\n",))
    assert (got[STDOUT], got[STDERR]) == (b"got ping\n", b"e\n")
    assert json.loads(got[ERROR])["details"]["causes"] == [{"reason": "ExitCode",
                                                            "message": "2"}]
    # A terminal, resized on channel 4.
    url = await node.exec_url(sleeper, "sh", "-c", 'while [ "$(stty size 2>/dev/null)" != '
                              '"25 90" ]; do sleep 0.05; done; echo "size $(stty size)"',
                              tty=True)
    got, _ = await ws_exec(url, V4, send=(bytes([RESIZE]) + b'{"Width":90,"Height":25}',))
    assert got[STDOUT] == b"size 25 90\r\n" and got[ERROR] == SUCCESS


async def test_attach(node: StreamNode) -> None:
    echo = await node.run("echo", "sh", "-c", 'while read line; do echo "echo:$line"; done',
                          stdin=True)
    url = (await node.runtime.Attach(cri.AttachRequest(
        container_id=echo, stdin=True, stdout=True, stderr=True))).url
    client = await SpdyClient.connect(url, [V4])
    error, stdin, out, _ = await client.open_streams("error", "stdin", "stdout", "stderr")
    await stdin.send(b"hello\n")
    assert await out.read_until(b"echo:hello\n") == b"echo:hello\n"
    await stdin.send(b"again\n")
    await out.read_until(b"echo:again\n")
    # Leaving (the client closes the connection) leaves the container running.
    await client.close()
    await asyncio.sleep(0.2)
    status = (await node.runtime.ContainerStatus(cri.ContainerStatusRequest(
        container_id=echo))).status
    assert status.state == cri.CONTAINER_RUNNING
    assert error.reset_status == 0

    # A terminal container, resized through its own monitor.
    term = await node.run("term", "sh", "-c", 'while [ "$(stty size 2>/dev/null)" != "33 99" ]; '
                          'do sleep 0.05; done; echo resized; sleep 3600', tty=True, stdin=True)
    url = (await node.runtime.Attach(cri.AttachRequest(container_id=term, stdout=True,
                                                       tty=True))).url
    client = await SpdyClient.connect(url, [V4])
    _, out, resize = await client.open_streams("error", "stdout", "resize")
    await resize.send(b'{"Width":99,"Height":33}')
    assert (await out.read_until(b"resized\r\n")).endswith(b"resized\r\n")
    await client.close()

    # Output of a running container over WebSocket; the stream ends when it exits.
    ticker = await node.run("ticker", "sh", "-c", "sleep 2; for i in 1 2 3 4 5; do "
                            "echo tick $i; sleep 0.1; done")
    url = (await node.runtime.Attach(cri.AttachRequest(container_id=ticker, stdout=True,
                                                       stderr=True))).url
    got, _ = await ws_exec(url, V4)
    assert got[STDOUT] == b"".join(b"tick %d\n" % i for i in range(1, 6))
    assert got[ERROR] == SUCCESS


async def _attach_url(node: StreamNode, cid: str) -> str:
    return (await node.runtime.Attach(cri.AttachRequest(
        container_id=cid, stdin=True, stdout=True, stderr=True))).url


async def _state(node: StreamNode, cid: str) -> int:
    return (await node.runtime.ContainerStatus(cri.ContainerStatusRequest(
        container_id=cid))).status.state


async def test_attach_session_ends_with_the_clients_stdin(node: StreamNode) -> None:
    """containerd's rule (pkg/cri/io ContainerIO.Attach): when the client's stdin ends, a
    container created stdin_once closes its stdin and the session streams on until it
    exits; any other container keeps its stdin open for the next attach and the session
    ends there, successfully."""
    # Its loop ends (and the container exits) only if its stdin is closed.
    script = 'while read line; do echo "echo:$line"; done; echo "stdin closed"'
    keeper = await node.run("keeper", "sh", "-c", script, stdin=True, stdin_once=False)

    client = await SpdyClient.connect(await _attach_url(node, keeper), [V4])
    error, stdin, out, err = await client.open_streams("error", "stdin", "stdout", "stderr")
    await stdin.send(b"one\n")
    await out.read_until(b"echo:one\n")
    await stdin.close()  # crictl attach -i whose own stdin ended
    rest = await asyncio.gather(out.read_all(timeout=10), err.read_all(timeout=10),
                                error.read_all(timeout=10))
    assert rest == [b"", b"", SUCCESS]
    assert out.fin_received and error.fin_received
    await client.close()

    # The container's stdin is still open: a second attach (WebSocket v5, whose client ends
    # stdin on channel 255) is read by the same loop.
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(
                (await _attach_url(node, keeper)).replace("http://", "ws://"),
                protocols=(V5,)) as ws:
            assert ws.protocol == V5
            await ws.send_bytes(bytes([STDIN]) + b"two\n")
            got: dict[int, bytes] = {}
            closed = False
            async with asyncio.timeout(10):
                async for msg in ws:
                    got[msg.data[0]] = got.get(msg.data[0], b"") + msg.data[1:]
                    if got.get(STDOUT) == b"echo:two\n" and not closed:
                        await ws.send_bytes(bytes([CLOSE, STDIN]))
                        closed = True
    assert got[STDOUT] == b"echo:two\n" and got[ERROR] == SUCCESS
    await asyncio.sleep(0.3)
    assert await _state(node, keeper) == cri.CONTAINER_RUNNING

    # stdin_once: the end of the client's stdin is the container's; its output (what the
    # script prints after its loop) still arrives, and the session ends when it exits.
    once = await node.run("once", "sh", "-c", script, stdin=True, stdin_once=True)
    client = await SpdyClient.connect(await _attach_url(node, once), [V4])
    error, stdin, out, _ = await client.open_streams("error", "stdin", "stdout", "stderr")
    await stdin.send(b"three\n")
    await out.read_until(b"echo:three\n")
    await stdin.close()
    assert await out.read_all(timeout=10) == b"stdin closed\n"
    assert await error.read_all(timeout=10) == SUCCESS
    await client.close()
    for _ in range(50):
        if await _state(node, once) == cri.CONTAINER_EXITED:
            break
        await asyncio.sleep(0.1)
    assert await _state(node, once) == cri.CONTAINER_EXITED


async def test_port_forward(node: StreamNode) -> None:
    # An echo server on 8080 inside the pod (-ll: every connection answered by its own cat).
    await node.run("echoserver", "nc", "-ll", "-p", "8080", "-e", "cat")
    url = await node.portforward_url(8080)
    client = await SpdyClient.connect(url, ["portforward.k8s.io"])
    assert client.protocol == "portforward.k8s.io"

    async def connection(request_id: int, port: int, payload: bytes) -> tuple[bytes, bytes]:
        headers = {"port": str(port), "requestID": str(request_id)}
        error = await client.open_stream({"streamType": "error", **headers})
        data = await client.open_stream({"streamType": "data", **headers})
        await data.send(payload)
        await data.close()  # half-close: the server still answers
        return await data.read_all(), await error.read_all()

    for _ in range(50):  # the server may need a moment to listen
        got, err = await connection(0, 8080, b"ping")
        if got:
            break
        await asyncio.sleep(0.1)
    assert (got, err) == (b"ping", b"")
    # Concurrent connections over one SPDY session, and a port nobody listens on.
    results = await asyncio.gather(connection(1, 8080, b"one"), connection(2, 8080, b"two"),
                                   connection(3, 9999, b"nobody"))
    assert results[0] == (b"one", b"") and results[1] == (b"two", b"")
    assert results[2][0] == b"" and b"error forwarding port 9999" in results[2][1]
    await client.close()

    # WebSocket: the port comes first on both channels, little endian.
    url = await node.portforward_url(8080)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http://", "ws://"),
                                      protocols=("v4.channel.k8s.io",)) as ws:
            port = struct.pack("<H", 8080)
            first = [await ws.receive_bytes(timeout=10), await ws.receive_bytes(timeout=10)]
            assert sorted(first) == [b"\x00" + port, b"\x01" + port]
            await ws.send_bytes(b"\x00hello over websocket\n")
            echoed = b""
            async with asyncio.timeout(10):
                while b"\n" not in echoed:
                    msg = await ws.receive_bytes()
                    assert msg[0] == 0
                    echoed += msg[1:]
            assert echoed == b"hello over websocket\n"


async def test_tokens_and_validation(node: StreamNode, sleeper: str) -> None:
    url = await node.exec_url(sleeper, "true")
    _, _, status, client = await spdy_exec(url, protocols=[V4])
    await client.close()
    assert status == SUCCESS
    with pytest.raises(UpgradeFailed) as second:
        await SpdyClient.connect(url, [V4])
    assert second.value.status == 404
    with pytest.raises(UpgradeFailed) as made_up:
        await SpdyClient.connect(url.rsplit("/", 1)[0] + "/not-a-token", [V4])
    assert made_up.value.status == 404
    # A protocol we do not speak: refused, naming what we accept.
    with pytest.raises(UpgradeFailed) as refused:
        await SpdyClient.connect(await node.exec_url(sleeper, "true"), ["v9.channel.k8s.io"])
    assert refused.value.status == 403
    assert V4 in refused.value.headers["x-accepted-stream-protocol-versions"]

    async def code(request: object, rpc: str) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(node.runtime, rpc)(request)
        return err.value.code()

    assert await code(cri.ExecRequest(container_id="nope", cmd=["true"], stdout=True),
                      "Exec") == grpc.StatusCode.NOT_FOUND
    assert await code(cri.ExecRequest(container_id=sleeper, cmd=["true"], tty=True,
                                      stdout=True, stderr=True),
                      "Exec") == grpc.StatusCode.INVALID_ARGUMENT
    assert await code(cri.ExecRequest(container_id=sleeper, cmd=["true"]),
                      "Exec") == grpc.StatusCode.INVALID_ARGUMENT
    assert await code(cri.PortForwardRequest(pod_sandbox_id="nope", port=[80]),
                      "PortForward") == grpc.StatusCode.NOT_FOUND
    done = await node.run("done", "true")
    for _ in range(100):
        status = (await node.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=done))).status
        if status.state == cri.CONTAINER_EXITED:
            break
        await asyncio.sleep(0.05)
    assert await code(cri.ExecRequest(container_id=done, cmd=["true"], stdout=True),
                      "Exec") == grpc.StatusCode.FAILED_PRECONDITION
    assert await code(cri.AttachRequest(container_id=done, stdout=True),
                      "Attach") == grpc.StatusCode.FAILED_PRECONDITION


async def test_streams_resolve_unique_id_prefixes(node: StreamNode, sleeper: str) -> None:
    """`crictl exec ID-PREFIX` and port-forward by a short pod id: every RPC resolves ids
    the same way (a unique prefix names the object), and an unknown id is NOT_FOUND."""
    url = await node.exec_url(sleeper[:12], "sh", "-c", "echo by-prefix")
    out, _, status, client = await spdy_exec(url, protocols=[V4])
    await client.close()
    assert (out, status) == (b"by-prefix\n", SUCCESS)
    ws_url = (await node.runtime.Attach(cri.AttachRequest(
        container_id=sleeper[:12], stdout=True))).url
    assert "/attach/" in ws_url
    assert (await node.runtime.PortForward(cri.PortForwardRequest(
        pod_sandbox_id=node.pod[:12], port=[80]))).url
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await node.exec_url("f" * 12 + "nope", "true")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
