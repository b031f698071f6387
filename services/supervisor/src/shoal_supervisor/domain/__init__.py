"""How the supervisor runs containers: conmon + the OCI runtime, exits, OOM, cgroup stats."""
