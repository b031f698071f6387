"""Per-registry TLS settings as an ssl.SSLContext."""

from __future__ import annotations

import ssl

from shoal_common.errors import FailedPrecondition

from shoal_puller.config import RegistryHostConfig


def has_tls_settings(cfg: RegistryHostConfig) -> bool:
    return bool(cfg.ca_file or cfg.client_cert or cfg.skip_verify)


def ssl_context(host: str, cfg: RegistryHostConfig) -> ssl.SSLContext | None:
    """A context for `host` with its extra CA, client certificate and skip_verify; None when
    the registry has no TLS settings (the system trust store then applies)."""
    if not has_tls_settings(cfg):
        return None
    # The system CAs stay trusted: ca_file adds to them, as containerd's hosts config does.
    ctx = ssl.create_default_context()
    try:
        if cfg.ca_file:
            ctx.load_verify_locations(cafile=cfg.ca_file)
        if cfg.client_cert:
            ctx.load_cert_chain(cfg.client_cert, cfg.client_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise FailedPrecondition(f"registry {host}: cannot load TLS files: {exc}") from None
    if cfg.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
