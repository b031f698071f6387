"""Domain logic of the executor: OCI specs, bundles, pod sandboxes."""
