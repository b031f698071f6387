"""CRI ImageService. RPCs not written yet answer UNIMPLEMENTED (the generated base)."""

from __future__ import annotations

from cri_api.v1 import api_pb2_grpc as cri_grpc
from shoal_common.bus import Bus


class ImageService(cri_grpc.ImageServiceServicer):
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
