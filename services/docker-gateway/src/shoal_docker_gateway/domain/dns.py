"""Name resolution on Docker's user networks, as Docker's embedded DNS gives it: a container
finds the others on its network by name, alias and short id.

Docker answers at 127.0.0.11 inside each container's namespace; Shoal does what podman's
aardvark-dns does instead: the gateway answers on each user bridge network's gateway
address, port 53 (UDP and TCP), in the host's network namespace, where the network's
bridge has that address; the containers' resolv.conf names it (the pod's CRI DNSConfig).
A container on several networks asks the server of the one it was made on (its
resolv.conf): names of the others it is on are answered too (each network's names, as the
asker's address on this one says which it is on), as Docker's resolver gives them.
Names of the network's containers are answered from the records (read again at most every
REFRESH seconds, and at once for a name not known yet, so a container made a moment ago
resolves and a removed one is gone); single-label names and the reverse zone of the
network's subnet are answered here (NXDOMAIN when unknown); other names are forwarded to
the host's resolvers (/etc/resolv.conf).

What a hostile client could steer is kept in bounds: only the gateway address the executor
reports for a network of its own (bridge `shl-…`, the address inside the network's subnet
and on no other interface of the host) is ever bound, never a wildcard; only clients inside
the subnet get an answer; forwarded queries are bounded in number and time."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import structlog
from dnslib import (
    AAAA,
    CLASS,
    PTR,
    QTYPE,
    RCODE,
    RR,
    A,
    DNSRecord,
)

log = structlog.get_logger("shoal.docker.dns")

PORT = 53
REFRESH = 1.0  # seconds a network's names are used before they are read again
MISS_REFRESH = 0.2  # a name not known is looked up again once it is this old
SYNC_EVERY = 5.0  # seconds between looks at which networks need a server
FORWARD_TIMEOUT = 2.0
MAX_FORWARDS = 64  # forwarded queries in flight per network
MAX_INFLIGHT = 256  # UDP queries being answered per network (more are dropped)
TCP_IDLE = 10.0
MAX_TCP = 32  # TCP connections per network
MAX_OTHERS = 64  # other networks' names kept per network
UDP_LIMIT = 512  # a reply of ours, without EDNS (glibc and busybox retry over TCP)
TTL = 0  # containers come and go: resolvers must not keep the answers
BRIDGE_RE = re.compile(r"\Ashl-[0-9a-f]{11}\Z")  # the executor's bridges (BRIDGE_PREFIX)
RESOLV_CONF = Path("/etc/resolv.conf")
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # Linux's; not in every Python build

Ip = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Target:
    """A network that wants a server: what the executor says of it."""

    net_id: str  # Docker's id
    gateway: str
    subnet: str
    bridge: str


@dataclass
class Names:
    """A network's containers: lower-case name → addresses, reverse name → container."""

    by_name: dict[str, list[str]] = field(default_factory=dict)
    by_reverse: dict[str, str] = field(default_factory=dict)
    peers: dict[str, list[str]] = field(default_factory=dict)  # address → its other networks
    read_at: float = 0.0


TargetsFn = Callable[[], Awaitable[list[Target]]]
NamesFn = Callable[[str], Awaitable[Names]]


def check_target(t: Target, host_addresses: dict[str, str]) -> str:
    """Why `t` must not be bound ("" = it may): `host_addresses` maps each address the host
    has to its interface."""
    if not BRIDGE_RE.match(t.bridge):
        return f"bridge {t.bridge!r} is not one the executor made"
    try:
        gateway, subnet = ipaddress.ip_address(t.gateway), ipaddress.ip_network(t.subnet)
    except ValueError:
        return "no valid gateway and subnet"
    if gateway not in subnet or gateway.is_loopback or gateway.is_unspecified or \
            gateway.is_multicast or gateway.is_link_local:
        return f"gateway {gateway} is not a unicast address of {subnet}"
    owner = host_addresses.get(str(gateway))
    if owner is not None and owner != t.bridge:
        return f"{gateway} is an address of {owner}, not of the network's bridge"
    return ""


async def host_addresses() -> dict[str, str]:
    """Each address of the host's interfaces → the interface's name."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "-j", "addr", "show", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    found: dict[str, str] = {}
    with contextlib.suppress(ValueError, TypeError):
        for link in json.loads(out or b"[]"):
            for addr in link.get("addr_info", []):
                if isinstance(addr, dict) and isinstance(addr.get("local"), str):
                    found[addr["local"]] = str(link.get("ifname", ""))
    return found


def upstreams(exclude: set[str]) -> list[str]:
    """The host's resolvers (at most three, as glibc reads), none of our own addresses."""
    try:
        text = RESOLV_CONF.read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and parts[1] not in exclude:
            with contextlib.suppress(ValueError):
                found.append(str(ipaddress.ip_address(parts[1])))
    return found[:3]


def reverse_address(qname: str) -> Ip | None:
    """The address a reverse-zone name stands for (None if it is not one)."""
    labels = qname.split(".")
    try:
        if qname.endswith(".in-addr.arpa") and len(labels) == 6:
            return ipaddress.IPv4Address(".".join(reversed(labels[:4])))
        if qname.endswith(".ip6.arpa") and len(labels) == 34:
            nibbles = "".join(reversed(labels[:32]))
            return ipaddress.IPv6Address(int(nibbles, 16))
    except ValueError:
        return None
    return None


def _socket(address: str, kind: int, port: int) -> socket.socket:
    """A socket bound to `address`:`port`. IP_FREEBIND: the bridge gets its address when its
    first pod is attached, and the server must be there for that pod's first query."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:  # TIME_WAIT only: never shares a listening port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.bind((address, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class NetworkDns:
    """One network's server: UDP and TCP on its gateway address."""

    def __init__(self, target: Target, names: NamesFn, upstreams: Callable[[], list[str]],
                 port: int = PORT) -> None:
        self.target = target
        self.port = port
        self.subnet: Net = ipaddress.ip_network(target.subnet)
        self._names_fn = names
        self._upstreams = upstreams
        self._names = Names()
        self._others: dict[str, Names] = {}  # the other networks of askers on this one
        self._lock = asyncio.Lock()
        self._forwards = asyncio.Semaphore(MAX_FORWARDS)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_count = 0

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        udp = _socket(self.target.gateway, socket.SOCK_DGRAM, self.port)
        try:
            tcp = _socket(self.target.gateway, socket.SOCK_STREAM, self.port)
        except BaseException:
            udp.close()
            raise
        try:
            self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
            self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)
        except BaseException:
            udp.close()
            tcp.close()
            await self.close()
            raise

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()

    def admits(self, client: str) -> bool:
        try:
            return ipaddress.ip_address(client.partition("%")[0]) in self.subnet
        except ValueError:
            return False

    # -- answering -------------------------------------------------------------------------

    async def names(self, qname: str) -> Names:
        age = time.monotonic() - self._names.read_at
        if age < REFRESH and (qname in self._names.by_name or age < MISS_REFRESH):
            return self._names
        async with self._lock:
            if self._names.read_at < time.monotonic() - MISS_REFRESH:
                try:
                    fresh = await self._names_fn(self.target.net_id)
                except Exception as exc:  # the executor away: the names we had
                    log.info("reading a network's names failed", network=self.target.net_id,
                             error=str(exc))
                else:
                    fresh.read_at = time.monotonic()
                    self._names = fresh
        return self._names

    async def other_names(self, net_id: str) -> Names:
        """Another network's names, for an asker on it too (kept REFRESH seconds)."""
        found = self._others.get(net_id)
        if found is not None and time.monotonic() - found.read_at < REFRESH:
            return found
        try:
            found = await self._names_fn(net_id)
        except Exception as exc:  # the executor away: none from there
            log.info("reading a network's names failed", network=net_id, error=str(exc))
            return found or Names()
        found.read_at = time.monotonic()
        if len(self._others) > MAX_OTHERS:
            self._others.clear()
        self._others[net_id] = found
        return found

    async def _addresses(self, qname: str, client: str) -> tuple[Names, list[str] | None]:
        names = await self.names(qname)
        addresses = names.by_name.get(qname)
        for other in names.peers.get(client, []) if addresses is None else []:
            addresses = (await self.other_names(other)).by_name.get(qname)
            if addresses is not None:
                break
        return names, addresses

    async def answer(self, data: bytes, limit: int = 65535, client: str = "") -> bytes | None:
        """The reply to a query (None: dropped, it is not one); a reply of ours longer
        than `limit` (UDP's 512) is truncated, so the client asks again over TCP."""
        try:
            req = DNSRecord.parse(data)
        except Exception:  # any malformed packet: dnslib raises more than DNSError
            return None
        if req.header.qr:
            return None
        reply = req.reply()
        if req.header.opcode != 0 or len(req.questions) != 1:
            reply.header.rcode = RCODE.NOTIMP
            return bytes(reply.pack())
        q = req.q
        qname = str(q.qname).rstrip(".").lower()
        if q.qclass == CLASS.IN:
            local = await self._local(qname, q.qtype, reply, client)
            if local is not None:
                return local if len(local) <= limit else bytes(reply.truncate().pack())
        return await self._forward(data, reply)

    async def _local(self, qname: str, qtype: int, reply: DNSRecord, client: str
                     ) -> bytes | None:
        names, addresses = await self._addresses(qname, client)
        if addresses is not None:
            for text in addresses:
                ip = ipaddress.ip_address(text)
                if ip.version == 4 and qtype in (QTYPE.A, QTYPE.ANY):
                    reply.add_answer(RR(reply.q.qname, QTYPE.A, rdata=A(text), ttl=TTL))
                elif ip.version == 6 and qtype in (QTYPE.AAAA, QTYPE.ANY):
                    reply.add_answer(RR(reply.q.qname, QTYPE.AAAA, rdata=AAAA(text),
                                        ttl=TTL))
            return bytes(reply.pack())  # no record of that type: NOERROR, no answer
        target = reverse_address(qname)
        if target is not None and target in self.subnet:
            owner = names.by_reverse.get(qname)
            if owner is not None and qtype in (QTYPE.PTR, QTYPE.ANY):
                reply.add_answer(RR(reply.q.qname, QTYPE.PTR, rdata=PTR(owner + "."),
                                    ttl=TTL))
            elif owner is None:
                reply.header.rcode = RCODE.NXDOMAIN
            return bytes(reply.pack())
        if qname and "." not in qname:  # a container's name that is not (or no longer) here
            reply.header.rcode = RCODE.NXDOMAIN
            return bytes(reply.pack())
        return None

    async def _forward(self, data: bytes, reply: DNSRecord) -> bytes:
        reply.header.rcode = RCODE.SERVFAIL  # unless an upstream answers
        if self._forwards.locked():
            return bytes(reply.pack())
        async with self._forwards:
            for server in self._upstreams():
                answer = await _ask(server, data)
                if answer is not None:
                    return answer
        return bytes(reply.pack())

    # -- transports ------------------------------------------------------------------------

    def spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def busy(self) -> bool:
        return len(self._tasks) >= MAX_INFLIGHT

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not peer or not self.admits(str(peer[0])) or self._tcp_count >= MAX_TCP:
            writer.close()
            return
        self._tcp_count += 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                data = await asyncio.wait_for(reader.readexactly(int.from_bytes(head)),
                                              TCP_IDLE)
                out = await self.answer(data, client=str(peer[0]))
                if out is None:
                    break
                writer.write(len(out).to_bytes(2) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            self._tcp_count -= 1
            writer.close()


async def _ask(server: str, data: bytes) -> bytes | None:
    """One forwarded query to `server` (its reply must carry the query's id)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (server, PORT))
            await loop.sock_sendall(sock, data)
            deadline = loop.time() + FORWARD_TIMEOUT
            while (left := deadline - loop.time()) > 0:
                answer = await asyncio.wait_for(loop.sock_recv(sock, 65535), left)
                if answer[:2] == data[:2]:
                    return answer
        except (OSError, TimeoutError):
            return None
    return None


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: NetworkDns) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # 3.11's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not self.server.admits(str(addr[0])) or self.server.busy:
            return  # outsiders get nothing: this is not an open resolver
        self.server.spawn(self._reply(data, addr))

    async def _reply(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        out = await self.server.answer(data, limit=UDP_LIMIT, client=str(addr[0]))
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


class DnsService:
    """The servers of every network that wants one, kept in step with the networks: a
    loop looks every SYNC_EVERY seconds, and `serve` opens one at once (at a container's
    create, before its pod's first query)."""

    def __init__(self, targets: TargetsFn, names: NamesFn) -> None:
        self._targets = targets
        self._names = names
        self.servers: dict[str, NetworkDns] = {}
        self._refused: dict[str, str] = {}  # network id → why it was not bound (logged once)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for server in self.servers.values():
            await server.close()
        self.servers.clear()

    def _upstreams(self) -> list[str]:
        return upstreams({s.target.gateway for s in self.servers.values()})

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception as exc:  # the executor away for a while: tried again
                log.info("syncing DNS servers failed", error=str(exc))
            await asyncio.sleep(SYNC_EVERY)

    async def sync(self) -> None:
        wanted = {t.net_id: t for t in await self._targets()}
        async with self._lock:
            for net_id in [n for n, s in self.servers.items() if wanted.get(n) != s.target]:
                await self.servers.pop(net_id).close()
        for target in wanted.values():
            await self.serve(target)

    async def serve(self, target: Target) -> None:
        """A server for `target`'s network, opened if it has none."""
        async with self._lock:
            current = self.servers.get(target.net_id)
            if current is not None and current.target == target:
                return
            if current is not None:
                await self.servers.pop(target.net_id).close()
            why = check_target(target, await host_addresses())
            if not why:
                server = NetworkDns(target, self._names, self._upstreams)
                try:
                    await server.open()
                except OSError as exc:
                    why = f"binding {target.gateway}:{PORT}: {exc.strerror or exc}"
                else:
                    self.servers[target.net_id] = server
                    self._refused.pop(target.net_id, None)
                    log.info("DNS server listening", network=target.net_id,
                             address=target.gateway)
                    return
            if self._refused.get(target.net_id) != why:
                self._refused[target.net_id] = why
                log.warning("no DNS server for a network", network=target.net_id, why=why)

    async def forget(self, net_id: str) -> None:
        async with self._lock:
            server = self.servers.pop(net_id, None)
            self._refused.pop(net_id, None)
            if server is not None:
                await server.close()
