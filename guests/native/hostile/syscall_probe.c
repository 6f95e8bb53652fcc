/* syscall_probe ABI NR [A0 A1 A2]: make one raw system call; exit code = errno (0 = it worked).
 *
 *   syscall_probe x86_64 NR [args]  the native 64-bit ABI (`syscall`)
 *   syscall_probe x32 NR [args]     the x32 ABI: NR with __X32_SYSCALL_BIT (`syscall`)
 *   syscall_probe i386 NR [args]    the 32-bit ABI (`int $0x80`), as a 32-bit program would
 *   syscall_probe socketcall FAMILY socketcall(SYS_SOCKET) on the 32-bit ABI
 *   syscall_probe clone3 FLAGS      clone3 with FLAGS in its struct (the child exits at once)
 *
 * Numbers are raw on purpose: the point is to reach syscalls the C library may not name, and
 * numbers no kernel knows yet. Arguments are integers; pointers the kernel would read are
 * NULL, so an allowed call fails with EFAULT/EBADF/EINVAL rather than doing anything.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define X32_SYSCALL_BIT 0x40000000L
#define I386_SOCKETCALL 102
#define SYS_SOCKET_CALL 1
#define NR_CLONE3 435

struct clone3_args { /* struct clone_args, version 0 */
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

static long raw64(long nr, long a0, long a1, long a2) {
    long ret;
    register long r10 __asm__("r10") = 0;
    register long r8 __asm__("r8") = 0;
    register long r9 __asm__("r9") = 0;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a0), "S"(a1), "d"(a2), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

static long raw32(long nr, long a0, long a1, long a2) {
    int ret;
    __asm__ volatile("int $0x80"
                     : "=a"(ret)
                     : "a"((int)nr), "b"((int)a0), "c"((int)a1), "d"((int)a2)
                     : "memory");
    return ret;
}

static long arg(int argc, char **argv, int i) {
    return i < argc ? strtol(argv[i], NULL, 0) : 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fputs("usage: syscall_probe x86_64|x32|i386 NR [A0 A1 A2] | socketcall FAMILY | clone3 FLAGS\n",
              stderr);
        return 64;
    }
    const char *abi = argv[1];
    long nr = strtol(argv[2], NULL, 0);
    long a0 = arg(argc, argv, 3), a1 = arg(argc, argv, 4), a2 = arg(argc, argv, 5);
    long ret;
    if (strcmp(abi, "x86_64") == 0) {
        ret = raw64(nr, a0, a1, a2);
    } else if (strcmp(abi, "x32") == 0) {
        ret = raw64(nr | X32_SYSCALL_BIT, a0, a1, a2);
    } else if (strcmp(abi, "i386") == 0) {
        ret = raw32(nr, a0, a1, a2);
    } else if (strcmp(abi, "socketcall") == 0) {
        /* The 32-bit kernel reads the arguments from memory: it must sit below 4 GiB. */
        unsigned int *args = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
        if (args == MAP_FAILED) {
            perror("mmap");
            return 64;
        }
        args[0] = (unsigned int)nr; /* family */
        args[1] = 1;                /* SOCK_STREAM */
        args[2] = 0;
        ret = raw32(I386_SOCKETCALL, SYS_SOCKET_CALL, (long)(unsigned long)args, 0);
    } else if (strcmp(abi, "clone3") == 0) {
        struct clone3_args ca;
        memset(&ca, 0, sizeof ca);
        ca.flags = (uint64_t)nr;
        ca.exit_signal = SIGCHLD;
        ret = raw64(NR_CLONE3, (long)&ca, (long)sizeof ca, 0);
        if (ret == 0) _exit(0);
        if (ret > 0) waitpid((pid_t)ret, NULL, 0);
    } else {
        fprintf(stderr, "unknown ABI %s\n", abi);
        return 64;
    }
    if (ret < 0 && ret > -4096) {
        printf("%s %ld: %s\n", abi, nr, strerror((int)-ret));
        return (int)-ret;
    }
    printf("%s %ld: returned %ld\n", abi, nr, ret);
    return 0;
}
