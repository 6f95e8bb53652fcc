"""The container tier: OCI containers run by crun (runc as fallback, runsc for gVisor).

Every task gets a fresh container: a read-only root of host directories, /task read-only,
/task/output writable, new namespaces (no network but lo), uid 65534 without capabilities,
seccomp, rlimits and cgroup limits (memory, CPU, pids). ``ContainerTier(pool_size=N)`` keeps
containers created ahead so a run only starts one; a container is never used twice.
"""

from wasmbox.tiers.container.pool import ContainerPool
from wasmbox.tiers.container.tier import ContainerTier

__all__ = ["ContainerPool", "ContainerTier"]
