"""gRPC edge of the gateway: the CRI runtime.v1 RuntimeService and ImageService."""
