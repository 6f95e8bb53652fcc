"""The seccomp profile: allow by default, deny what could escape or attack the host kernel."""

from __future__ import annotations

import errno
from typing import Any

# Syscalls a task never needs and an escape often does: mounts, namespaces, tracing,
# kernel keyrings, BPF, perf, modules, kexec, clock and swap control, raw I/O ports.
DENIED: tuple[str, ...] = (
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "unshare", "setns",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "get_kernel_syms", "query_module",
    "reboot", "swapon", "swapoff", "acct", "syslog", "vhangup", "uselib", "nfsservctl",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "iopl", "ioperm", "open_by_handle_at", "name_to_handle_at", "quotactl",
    "lookup_dcookie", "_sysctl", "sysfs", "vm86", "vm86old",
)

# clone() flags that create namespaces; clone3 cannot be filtered by flags (they sit in a
# struct), so it returns ENOSYS and glibc falls back to clone().
_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)


def seccomp_profile() -> dict[str, Any]:
    """The OCI ``linux.seccomp`` section."""
    rules: list[dict[str, Any]] = [
        {"names": list(DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
    ]
    # One rule per flag: the conditions of one rule are ANDed, and "any of" is what we want.
    for flag in _NAMESPACE_FLAGS:
        rules.append({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": errno.EPERM,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
        })
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": rules,
    }
