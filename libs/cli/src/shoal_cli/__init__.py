"""The `shoal` CLI. Its CRI commands import grpc when they run; `shoal up` (whose preloaded
zygote must not have grpc) only the CRI's messages: see shoal_common.cri_proto."""

from shoal_common.cri_proto import messages_only

messages_only()
