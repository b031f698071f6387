"""Names Shoal keeps for itself (a leaf module: the config, the registry client and the
built-in images all import it)."""

# Shoal's built-in images (shoal.local/pause:1): made on the node, never fetched. `.local`
# is reserved for link-local names (RFC 6762) and never delegated in public DNS, so no real
# registry has it; the registry client refuses it and a pull of it is answered locally.
BUILTIN_HOST = "shoal.local"


def is_builtin_host(domain: str) -> bool:
    """`domain` (a reference's host[:port]) is the built-in host, on any port."""
    host, _, port = domain.rpartition(":")
    return domain == BUILTIN_HOST or (host == BUILTIN_HOST and port.isdigit())
