"""The seccomp profile: an allowlist. A syscall it does not name fails with EPERM.

The list is ours, curated from containers-common's default profile (Debian
``golang-github-containers-common``, ``/usr/share/containers/seccomp.json``) down to what the
Python runner, /bin/sh, coreutils/busybox-style tools and ordinary programs use. Left out on
purpose: mounts and namespaces, tracing and cross-process memory access (ptrace,
process_vm_*, pidfd_getfd, process_madvise, kcmp), keyrings, BPF, perf, io_uring,
userfaultfd, modules, kexec, clock/swap/quota control, raw I/O ports, file handles, and the
32-bit socketcall multiplexer, whose arguments sit in memory where no filter can read them.

Because the default is to deny, a syscall newer than this list (open_tree_attr, listmount,
anything a later kernel adds) is denied without anyone having to name it. The same names
are applied on all three x86 ABIs (64-bit, x32, 32-bit), so a 32-bit or x32 entry point to
a syscall is no way around the list.
"""

from __future__ import annotations

import errno
from typing import Any

_FILES = (
    "read", "write", "open", "openat", "openat2", "creat", "close", "close_range",
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs",
    "lseek", "pread64", "pwrite64", "readv", "writev", "preadv", "pwritev", "preadv2",
    "pwritev2", "access", "faccessat", "faccessat2", "pipe", "pipe2", "dup", "dup2", "dup3",
    "fcntl", "flock", "fsync", "fdatasync", "sync", "syncfs", "sync_file_range",
    "truncate", "ftruncate", "fallocate", "fadvise64", "readahead",
    "getdents", "getdents64", "getcwd", "chdir", "fchdir",
    "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir",
    "link", "linkat", "unlink", "unlinkat", "symlink", "symlinkat", "readlink", "readlinkat",
    "chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown", "fchownat", "umask",
    "utime", "utimes", "utimensat", "futimesat", "mknod", "mknodat",  # FIFOs; devices need caps
    "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "inotify_init", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
    "copy_file_range", "sendfile", "splice", "tee", "ioctl", "memfd_create",
)
_MEMORY = (
    "brk", "mmap", "munmap", "mprotect", "mremap", "msync", "mincore", "madvise",
    "mlock", "mlock2", "munlock", "mlockall", "munlockall", "remap_file_pages", "membarrier",
    "pkey_alloc", "pkey_free", "pkey_mprotect", "get_mempolicy", "set_mempolicy", "mbind",
)
_PROCESSES = (
    "fork", "vfork", "execve", "execveat", "exit", "exit_group", "wait4", "waitid",
    "kill", "tkill", "tgkill", "getpid", "getppid", "gettid", "getpgid", "setpgid", "getpgrp",
    "getsid", "setsid", "set_tid_address", "set_robust_list", "get_robust_list", "futex",
    "arch_prctl", "prctl", "rseq", "pidfd_open", "pidfd_send_signal", "restart_syscall",
    "getrusage", "getrlimit", "setrlimit", "prlimit64", "getpriority", "setpriority",
    "sched_yield", "sched_getaffinity", "sched_setaffinity", "sched_getparam",
    "sched_setparam", "sched_getscheduler", "sched_setscheduler", "sched_get_priority_max",
    "sched_get_priority_min", "sched_rr_get_interval", "sched_getattr", "sched_setattr",
    "ioprio_get", "ioprio_set", "getcpu", "capget", "capset", "seccomp",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    "uname", "sysinfo", "getrandom", "times",
)
_IDENTITY = (  # without capabilities these only switch among the task's own ids
    "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "setfsuid", "setfsgid",
)
_SIGNALS = (
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend",
    "rt_sigtimedwait", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "sigaltstack", "pause",
    "alarm", "signalfd", "signalfd4",
)
_TIME = (
    "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "time",
    "getitimer", "setitimer", "timer_create", "timer_settime", "timer_gettime",
    "timer_getoverrun", "timer_delete", "timerfd_create", "timerfd_settime", "timerfd_gettime",
)
_EVENTS = (
    "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2",
    "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents",
)
_SOCKETS = (  # `socket` and `socketpair` themselves are allowed per family, below
    "bind", "listen", "accept", "accept4", "connect", "getsockname", "getpeername",
    "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "shutdown",
    "setsockopt", "getsockopt",
)
_IPC = (  # System V and POSIX IPC stay inside the container's IPC namespace
    "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semtimedop", "semctl",
    "shmget", "shmat", "shmdt", "shmctl", "mq_open", "mq_unlink", "mq_timedsend",
    "mq_timedreceive", "mq_notify", "mq_getsetattr",
)
_X86_32 = (  # names only the 32-bit ABI has: its large-file, 32-bit-id and time64 variants
    "_llseek", "_newselect", "mmap2", "fcntl64", "fstat64", "fstatat64", "lstat64", "stat64",
    "statfs64", "fstatfs64", "ftruncate64", "truncate64", "sendfile64", "fadvise64_64",
    "chown32", "fchown32", "lchown32", "getuid32", "geteuid32", "getgid32", "getegid32",
    "getgroups32", "setgroups32", "setuid32", "setgid32", "setreuid32", "setregid32",
    "setresuid32", "setresgid32", "getresuid32", "getresgid32", "setfsuid32", "setfsgid32",
    "ugetrlimit", "waitpid", "sigaction", "sigprocmask", "sigreturn", "sigsuspend",
    "sigpending", "signal", "set_thread_area", "get_thread_area",
    "clock_gettime64", "clock_getres_time64", "clock_nanosleep_time64", "futex_time64",
    "ppoll_time64", "pselect6_time64", "recvmmsg_time64", "rt_sigtimedwait_time64",
    "sched_rr_get_interval_time64", "semtimedop_time64", "timer_gettime64", "timer_settime64",
    "timerfd_gettime64", "timerfd_settime64", "utimensat_time64", "mq_timedsend_time64",
    "mq_timedreceive_time64",
)

ALLOWED: tuple[str, ...] = tuple(sorted(set(
    _FILES + _MEMORY + _PROCESSES + _IDENTITY + _SIGNALS + _TIME + _EVENTS + _SOCKETS + _IPC
    + _X86_32
)))

# runsc names some syscalls its own way and silently drops names it does not know.
GVISOR_ALIASES: tuple[str, ...] = ("pselect",)  # pselect6 (bash's `read -t`, glibc pselect)

# Newer syscalls that the C library tries first and falls back from on ENOSYS only: clone3
# carries its flags in a struct no filter can read, so it must send glibc back to clone().
NOT_IMPLEMENTED: tuple[str, ...] = ("clone3",)

# Socket families a task may open: local sockets, and IPv4/IPv6 (only lo exists). Not
# AF_VSOCK (it reaches the hypervisor when the host is a VM), AF_PACKET, AF_ALG, ...
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
SOCKET_FAMILIES: tuple[int, ...] = (AF_UNIX, AF_INET, AF_INET6)
NETLINK_ROUTE = 0  # read-only views of the container's own interfaces (getaddrinfo, ip)

# clone() flags that create namespaces: clone is allowed only with none of them.
NAMESPACE_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
# personality() values that change nothing a sandbox cares about (query, PER_LINUX,
# PER_LINUX32, UNAME26 variants), as container engines allow.
_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
ARCHITECTURES = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")


def seccomp_profile(*, gvisor: bool = False) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` section: deny (EPERM) everything the allowlist lacks.

    `gvisor` adapts it to runsc, which answers every errno action with EPERM (it ignores
    ``errnoRet``), so glibc would not fall back from a denied clone3 and no thread could
    start: clone3 goes to gVisor's kernel instead, which (in the runsc we run) does not
    implement it and says ENOSYS itself, and glibc falls back to the filtered clone().
    """
    allowed = [*ALLOWED, *GVISOR_ALIASES, *NOT_IMPLEMENTED] if gvisor else list(ALLOWED)
    rules: list[dict[str, Any]] = [
        # libseccomp turns a `socket` rule into an unconditional socketcall(SYS_SOCKET) on
        # the 32-bit ABI (the family sits in memory there), which would let AF_VSOCK through.
        # Refusing socketcall outright must come first (for one syscall the first rule wins)
        # and differ from the default action (runtimes drop rules that repeat it); ENOSYS
        # sends a 32-bit C library to the direct socket syscalls, which are filtered.
        {"names": ["socketcall"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
        {"names": allowed, "action": "SCMP_ACT_ALLOW"},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [_arg(0, "SCMP_CMP_MASKED_EQ", NAMESPACE_FLAGS, 0)]},
        {"names": ["socketpair"], "action": "SCMP_ACT_ALLOW",
         "args": [_arg(0, "SCMP_CMP_EQ", AF_UNIX)]},
        {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
         "args": [_arg(0, "SCMP_CMP_EQ", AF_NETLINK), _arg(2, "SCMP_CMP_EQ", NETLINK_ROUTE)]},
    ]
    if not gvisor:
        rules.append({"names": list(NOT_IMPLEMENTED), "action": "SCMP_ACT_ERRNO",
                      "errnoRet": errno.ENOSYS})
    # One rule per value: the conditions of one rule are ANDed, and "any of" is wanted here.
    rules += [{"names": ["socket"], "action": "SCMP_ACT_ALLOW",
               "args": [_arg(0, "SCMP_CMP_EQ", family)]} for family in SOCKET_FAMILIES]
    rules += [{"names": ["personality"], "action": "SCMP_ACT_ALLOW",
               "args": [_arg(0, "SCMP_CMP_EQ", value)]} for value in _PERSONALITIES]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.EPERM,
        "architectures": list(ARCHITECTURES),
        "syscalls": rules,
    }


def _arg(index: int, op: str, value: int, value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}
