"""The CRI's protobuf messages without grpc.

The `cri-api` package's __init__ re-exports its gRPC stubs, importing grpc: some 8 MiB and
30 ms in every process that loads it, and `shoal up`'s preloaded zygote must not have grpc
at all (grpc does not survive a fork). `messages_only()` registers the package without
running that __init__: its submodules import as usual (`from cri_api.v1 import api_pb2`,
and `api_pb2_grpc` too, which then brings grpc); only the names the __init__ re-exports are
missing, and Shoal uses none of them. A no-op once anything imported the package."""

from __future__ import annotations

import importlib.util
import sys


def messages_only() -> None:
    if "cri_api" not in sys.modules:
        spec = importlib.util.find_spec("cri_api")
        if spec is not None:
            sys.modules["cri_api"] = importlib.util.module_from_spec(spec)
