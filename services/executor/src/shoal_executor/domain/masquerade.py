"""Source NAT for a bridge network's pods: one rule set per network, not one per pod.

The CNI bridge plugin's `ipMasq` makes a nat chain per pod on every ADD and deletes it on
every DEL (about five iptables processes each way, most of a pod's CNI time). Shoal's own
bridge configs turn it off and say `"shoal": {"masquerade": true}` instead; the executor
then keeps, per subnet S, what Docker keeps per bridge network:

    -A POSTROUTING -s S -m comment --comment "shoal: masquerade pod network S" -j SHOAL-MASQ-<h>
    -A SHOAL-MASQ-<h> -d S -j RETURN             (pod to pod: not NATed)
    -A SHOAL-MASQ-<h> -d 224.0.0.0/4 -j RETURN   (multicast; ff00::/8 for IPv6)
    -A SHOAL-MASQ-<h> -j MASQUERADE              (everything else leaves as the host)

`<h>` is the first 12 hex digits of sha256(S), so the chain is found again from the subnet
alone. The executor owns their lifetime (domain/networks.py): ensured at start and when a
network is created, removed when it is removed and, on a clean stop, for networks no pod is
on. ensure() and remove() are idempotent.
"""

from __future__ import annotations

import hashlib
import ipaddress

from shoal_common.commands import run_command
from shoal_common.errors import Internal

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
TIMEOUT = 60.0
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
MAX_JUMPS = 64  # remove()'s bound on duplicate jumps (two racing ensures can add two)


def chain(subnet: Net) -> str:
    # 23 characters: iptables allows 28 in a chain name.
    return "SHOAL-MASQ-" + hashlib.sha256(str(subnet).encode()).hexdigest()[:12]


def _jump(subnet: Net) -> list[str]:
    return ["-s", str(subnet), "-m", "comment", "--comment",
            f"shoal: masquerade pod network {subnet}", "-j", chain(subnet)]


async def _run(argv: list[str], stdin: bytes | None = None) -> tuple[int, str]:
    """(exit code, stderr) of a command run without a shell."""
    try:
        done = await run_command(argv, stdin=stdin, timeout=TIMEOUT)
    except OSError as exc:
        raise Internal(f"{argv[0]}: {exc}") from None
    except TimeoutError:
        raise Internal(f"{' '.join(argv)} timed out") from None
    return done.returncode, done.stderr.decode(errors="replace").strip()


def _tool(subnet: Net) -> str:
    return "iptables" if subnet.version == 4 else "ip6tables"


async def _restore(subnet: Net, lines: list[str]) -> None:
    """One `iptables-restore --noflush` transaction in table nat: all of it or nothing.
    `:CHAIN - [0:0]` creates the chain or flushes just it, so a rewrite is idempotent."""
    name = chain(subnet)
    text = "\n".join(["*nat", f":{name} - [0:0]", *lines, "COMMIT", ""])
    tool = f"{_tool(subnet)}-restore"
    code, err = await _run([tool, "-w", "--noflush"], text.encode())
    if code != 0:
        raise Internal(f"{tool} of chain {name} failed: {err}")


async def ensure(subnet: Net) -> None:
    """The chain written afresh and exactly one jump to it from POSTROUTING."""
    name = chain(subnet)
    await _restore(subnet, [f"-A {name} -d {subnet} -j RETURN",
                            f"-A {name} -d {MULTICAST[subnet.version]} -j RETURN",
                            f"-A {name} -j MASQUERADE"])
    tool = _tool(subnet)
    code, err = await _run([tool, "-w", "-t", "nat", "-C", "POSTROUTING", *_jump(subnet)])
    if code == 0:
        return
    if code != 1:  # 1: no such rule; anything else is iptables failing
        raise Internal(f"{tool} -C POSTROUTING (jump to {name}) failed: {err}")
    code, err = await _run([tool, "-w", "-t", "nat", "-A", "POSTROUTING", *_jump(subnet)])
    if code != 0:
        raise Internal(f"{tool} -A POSTROUTING (jump to {name}) failed: {err}")


async def remove(subnet: Net) -> None:
    """Every jump, then the chain; what is already gone is no error."""
    name = chain(subnet)
    argv = [_tool(subnet), "-w", "-t", "nat", "-D", "POSTROUTING", *_jump(subnet)]
    for _ in range(MAX_JUMPS):
        code, _err = await _run(argv)
        if code != 0:  # no such jump (1) or no such chain (2): none left
            break
    # Declared (made if missing, else flushed) and deleted in one transaction: no "no such
    # chain" to tell from real failures. It fails while something still jumps to it.
    await _restore(subnet, [f"-X {name}"])
