"""Shoal executor service. It reads CRI messages but serves no gRPC: see
shoal_common.cri_proto."""

from shoal_common.cri_proto import messages_only

messages_only()
