"""The executor's edge: what a request may ask for, checked before anything is made.

Any peer on the bus may be compromised, so the executor checks pod and container configs,
image configs and rootfs mounts itself rather than trusting the API server, kubelet or the
snapshotter to have done so. A refusal is `Invalid` naming the field."""

from shoal_executor.domain.checks.cgroup import POD_CGROUP_ROOTS, pod_cgroup_parent
from shoal_executor.domain.checks.container import check_container_config, check_image_config
from shoal_executor.domain.checks.pod import check_pod_config
from shoal_executor.domain.checks.rootfs import confine_rootfs

__all__ = ["POD_CGROUP_ROOTS", "check_container_config", "check_image_config",
           "check_pod_config", "confine_rootfs", "pod_cgroup_parent"]
