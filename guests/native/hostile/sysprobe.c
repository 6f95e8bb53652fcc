/* sysprobe NAME: attempt one privileged operation; exit code = errno (0 = it worked). */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <signal.h>
#include <unistd.h>

static int attempt(const char *name) {
    if (strcmp(name, "mount") == 0) return mount("none", "/tmp", "tmpfs", 0, NULL);
    if (strcmp(name, "unshare") == 0) return unshare(CLONE_NEWUSER);
    if (strcmp(name, "ptrace") == 0) return (int)ptrace(PTRACE_TRACEME, 0, NULL, NULL);
    if (strcmp(name, "setuid") == 0) return setuid(0);
    if (strcmp(name, "chroot") == 0) return chroot("/tmp");
    if (strcmp(name, "clone_newuser") == 0) {
        pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, NULL, NULL, NULL, 0);
        if (pid == 0) _exit(0);
        if (pid > 0) waitpid(pid, NULL, 0);
        return pid < 0 ? -1 : 0;
    }
    errno = EINVAL;
    return -1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fputs("usage: sysprobe mount|unshare|ptrace|setuid|chroot|clone_newuser\n", stderr);
        return 64;
    }
    if (attempt(argv[1]) != 0) {
        printf("%s: %s\n", argv[1], strerror(errno));
        return errno;
    }
    printf("%s: allowed\n", argv[1]);
    return 0;
}
