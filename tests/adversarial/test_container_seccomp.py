"""Threat: a task in a container reaches kernel code it has no business with.

A container shares the host kernel (crun, runc) or talks to gVisor's (runsc). Namespaces and
dropped capabilities do not cover every syscall: some are new enough that no denylist names
them (``open_tree_attr``, ``listmount``, ``pidfd_getfd``, ``process_madvise``), some have an
older or foreign-ABI entry point (x32, 32-bit ``int $0x80``, ``socketcall``), and a socket
family like ``AF_VSOCK`` is not namespaced at all: on a host that is itself a VM it reaches
the hypervisor. The seccomp profile is therefore an allowlist that denies (EPERM) whatever
it does not name, on all three x86 ABIs, and opens sockets of the local and IP families only.
gVisor applies the same profile inside its sandbox (``--oci-seccomp``).

Each probe makes one raw syscall with harmless arguments and exits with its errno; without
the profile these calls succeed or fail with another errno (EFAULT, EBADF, ENOSYS).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from tests.container import conftest as container_fixtures
from wasmbox import Result, Sandbox, Status, Task
from wasmbox.tiers.container import ContainerTier
from wasmbox.tiers.container.runtime import SECCOMP_BPF_ANNOTATION
from wasmbox.tiers.container.seccomp import seccomp_profile

pytestmark = pytest.mark.container

# The container suite's fixtures, shared: a native-guest build and sandboxes that see it.
container_ready = container_fixtures.container_ready
native = container_fixtures.native
csb = container_fixtures.csb
make_csb = container_fixtures.make_csb
gvisor = container_fixtures.gvisor

PROBE = "/opt/guests/syscall_probe"
CLONE_NEWUSER = 0x10000000
AF_UNIX, AF_INET, AF_INET6, AF_VSOCK = 1, 2, 10, 40
SOCK_STREAM = 1

# Syscalls newer than any denylist we had; every kernel ABI uses the same numbers for them.
NEW_SYSCALLS = {
    "pidfd_getfd": 438,
    "process_madvise": 440,
    "listmount": 458,
    "open_tree_attr": 467,
    "unassigned_999": 999,
}

# Escape tools on each ABI: (number, first argument). unshare(CLONE_NEWUSER) and
# ptrace(PTRACE_TRACEME) succeed for an unprivileged task when nothing filters them.
ESCAPES = {
    "x86_64": {"unshare": (272, CLONE_NEWUSER), "ptrace": (101, 0), "keyctl": (250, 0),
               "io_uring_setup": (425, 0), "bpf": (321, 0), "setns": (308, 0)},
    "x32": {"unshare": (272, CLONE_NEWUSER), "ptrace": (521, 0), "keyctl": (250, 0),
            "io_uring_setup": (425, 0), "bpf": (321, 0), "setns": (308, 0)},
    "i386": {"unshare": (310, CLONE_NEWUSER), "ptrace": (26, 0), "keyctl": (288, 0),
             "io_uring_setup": (425, 0), "bpf": (357, 0), "setns": (346, 0)},
}


def probe(sb: Sandbox, *args: object, runtime: str | None = None) -> Result:
    """Run the syscall probe with `args`; its exit code is the errno (0: the call worked)."""
    return sb.run(Task.command([PROBE, *map(str, args)], runtime=runtime))


@pytest.mark.parametrize("name", NEW_SYSCALLS)
def test_syscalls_newer_than_the_profile_are_denied(csb: Sandbox, name: str) -> None:
    r = probe(csb, "x86_64", NEW_SYSCALLS[name])
    assert r.status is Status.FAILED
    assert r.exit_code == errno.EPERM, r.stdout


@pytest.mark.parametrize("abi", ESCAPES)
@pytest.mark.parametrize("name", ESCAPES["x86_64"])
def test_escape_syscalls_are_denied_on_every_abi(csb: Sandbox, abi: str, name: str) -> None:
    number, first = ESCAPES[abi][name]
    r = probe(csb, abi, number, first)
    assert r.exit_code == errno.EPERM, r.stdout


@pytest.mark.parametrize("name", ["open_tree_attr", "unassigned_999"])
def test_new_syscalls_are_denied_on_the_32_bit_abi(csb: Sandbox, name: str) -> None:
    r = probe(csb, "i386", NEW_SYSCALLS[name])
    assert r.exit_code == errno.EPERM, r.stdout


def test_clone3_is_not_implemented_so_the_c_library_falls_back_to_clone(csb: Sandbox) -> None:
    # clone3 hides its flags in a struct a filter cannot read; clone's are filtered.
    r = probe(csb, "x86_64", 435)
    assert r.exit_code == errno.ENOSYS, r.stdout


def test_clone3_cannot_create_a_user_namespace(csb: Sandbox) -> None:
    r = probe(csb, "clone3", CLONE_NEWUSER)
    assert r.exit_code == errno.ENOSYS, r.stdout


def test_vsock_socket_is_denied(csb: Sandbox) -> None:
    r = probe(csb, "x86_64", 41, AF_VSOCK, SOCK_STREAM)
    assert r.exit_code == errno.EPERM, r.stdout


@pytest.mark.parametrize(("family", "kind", "protocol"), [
    (38, 5, 0),  # AF_ALG: the kernel crypto API, a long line of CVEs
    (16, 3, 15),  # AF_NETLINK / NETLINK_KOBJECT_UEVENT: the host's device events
    (16, 3, 4),  # AF_NETLINK / NETLINK_SOCK_DIAG: other sockets on the machine
])
def test_other_socket_families_are_denied(csb: Sandbox, family: int, kind: int,
                                          protocol: int) -> None:
    r = probe(csb, "x86_64", 41, family, kind, protocol)
    assert r.exit_code == errno.EPERM, r.stdout


def test_vsock_socket_is_denied_on_the_32_bit_abi(csb: Sandbox) -> None:
    r = probe(csb, "i386", 359, AF_VSOCK, SOCK_STREAM)
    assert r.exit_code == errno.EPERM, r.stdout


def test_vsock_through_socketcall_is_denied(csb: Sandbox) -> None:
    # socketcall passes the family in memory, out of a filter's reach: it is refused whole.
    r = probe(csb, "socketcall", AF_VSOCK)
    assert r.exit_code in (errno.ENOSYS, errno.EPERM), r.stdout


@pytest.mark.parametrize("family", [AF_UNIX, AF_INET, AF_INET6])
def test_local_and_ip_sockets_still_open(csb: Sandbox, family: int) -> None:
    r = probe(csb, "x86_64", 41, family, SOCK_STREAM)
    assert (r.status, r.exit_code) == (Status.COMPLETED, 0), r.stdout


def test_python_threads_subprocesses_and_sockets_work_under_the_profile(csb: Sandbox) -> None:
    source = (
        "import socket, subprocess, threading\n"
        "def main(inp):\n"
        "    out = []\n"
        "    t = threading.Thread(target=out.append, args=(1,)); t.start(); t.join()\n"
        "    echo = subprocess.run(['/bin/echo', 'hi'], capture_output=True, check=True)\n"
        "    s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); s.close()\n"
        "    return {'thread': out, 'echo': echo.stdout.decode()}\n"
    )
    r = csb.run(Task.python(source, tier="container"))
    assert r.status is Status.COMPLETED, r.stderr
    assert r.output == {"thread": [1], "echo": "hi\n"}


def test_crun_reuses_the_filter_it_compiled_and_it_still_denies(
    make_csb: Callable[..., Sandbox],
) -> None:
    tier = ContainerTier(runtime="crun")
    sb = make_csb(tier)
    first = probe(sb, "x86_64", 41, AF_VSOCK, SOCK_STREAM)  # crun compiles the profile
    runtime = tier._runtime("crun")
    config = {"linux": {"seccomp": seccomp_profile()}}
    assert runtime.reuse_seccomp(config) is None  # ...and the next bundle carries its BPF
    assert SECCOMP_BPF_ANNOTATION in config["annotations"]
    second = probe(sb, "x86_64", 41, AF_VSOCK, SOCK_STREAM)
    third = probe(sb, "x86_64", NEW_SYSCALLS["open_tree_attr"])
    assert (first.exit_code, second.exit_code, third.exit_code) == (errno.EPERM,) * 3


def test_runc_denies_new_syscalls_too(make_csb: Callable[..., Sandbox]) -> None:
    tier = ContainerTier(runtime="runc")
    available = tier.availability()
    if not available.ok and "not installed" in available.reason:
        tier.close()
        pytest.skip(available.reason)
    sb = make_csb(tier)
    # runc answers ENOSYS for numbers past the newest syscall its libseccomp knows.
    r = probe(sb, "x86_64", NEW_SYSCALLS["open_tree_attr"])
    assert r.exit_code in (errno.EPERM, errno.ENOSYS), r.stdout
    r = probe(sb, "x86_64", 41, AF_VSOCK, SOCK_STREAM)
    assert r.exit_code == errno.EPERM, r.stdout




@pytest.mark.parametrize(("name", "args"), [
    ("unshare_newuser", (272, CLONE_NEWUSER)),
    ("io_uring_setup", (425, 0)),
    ("open_tree_attr", (467, 0)),
])
def test_gvisor_applies_the_profile(gvisor: Sandbox, name: str, args: tuple[int, int]) -> None:
    r = probe(gvisor, "x86_64", *args, runtime="gvisor")
    assert r.exit_code == errno.EPERM, (r.stdout, r.stderr)


def test_gvisor_denies_vsock(gvisor: Sandbox) -> None:
    r = probe(gvisor, "x86_64", 41, AF_VSOCK, SOCK_STREAM, runtime="gvisor")
    assert r.exit_code == errno.EPERM, (r.stdout, r.stderr)


def test_profile_denies_by_default_on_all_three_x86_abis() -> None:
    profile = seccomp_profile()
    assert (profile["defaultAction"], profile["defaultErrnoRet"]) == ("SCMP_ACT_ERRNO",
                                                                      errno.EPERM)
    assert set(profile["architectures"]) == {"SCMP_ARCH_X86_64", "SCMP_ARCH_X86",
                                             "SCMP_ARCH_X32"}


def test_gvisor_clone3_cannot_create_a_user_namespace(gvisor: Sandbox) -> None:
    # runsc answers every seccomp errno with EPERM, so clone3 is passed to gVisor's kernel
    # (glibc must see ENOSYS to fall back to clone). This runsc does not implement clone3;
    # should a newer one do, this fails: clone3's flags would then need another guard.
    r = probe(gvisor, "clone3", CLONE_NEWUSER, runtime="gvisor")
    assert r.exit_code in (errno.ENOSYS, errno.EPERM), (r.stdout, r.stderr)


def test_gvisor_profile_keeps_what_shells_use(gvisor: Sandbox) -> None:
    # runsc knows pselect6 as "pselect" and drops names it does not know: bash's `read -t`
    # got EPERM until the profile spoke runsc's name for it.
    r = gvisor.run(Task.command(["/bin/bash", "-c", "read -t 1 x < /dev/null; echo $?"],
                                runtime="gvisor"))
    assert (r.stdout, r.stderr) == ("1\n", ""), r.reason
