"""Internal: the sources of the guest's static C helpers, ``wbx-seed`` and ``wbx-run``.

`images` compiles them into the initramfs; `guest` describes what they do for a task.
"""

from __future__ import annotations

from wasmbox.tiers.vm.guest_init import SHARE_OPTIONS

SEED_HELPER = r"""
/* wbx-seed HEX [TIME]: credit 64 bytes of host entropy to the guest RNG and force a reseed,
   so a guest restored from a snapshot stops sharing its random stream with its siblings;
   then set the clock to TIME (seconds since the epoch; one exec fewer than `date -s`). */
#include <errno.h>
#include <stdlib.h>
#include <sys/time.h>
#include <fcntl.h>
#include <linux/random.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int nibble(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

int main(int argc, char **argv) {
    struct { int entropy_count; int buf_size; unsigned char buf[64]; } info;
    if (argc < 2 || argc > 3 || strlen(argv[1]) != 2 * sizeof info.buf) return 2;
    for (size_t i = 0; i < sizeof info.buf; i++) {
        int hi = nibble(argv[1][2 * i]), lo = nibble(argv[1][2 * i + 1]);
        if (hi < 0 || lo < 0) return 2;
        info.buf[i] = (unsigned char)(hi << 4 | lo);
    }
    memset(argv[1], 0, strlen(argv[1]));
    info.entropy_count = 8 * (int)sizeof info.buf;
    info.buf_size = (int)sizeof info.buf;
    int fd = open("/dev/urandom", O_WRONLY);
    if (fd < 0 || ioctl(fd, RNDADDENTROPY, &info) < 0) return 1;
    memset(&info, 0, sizeof info);
    /* ENODATA: the RNG was not ready yet, and the credit above just seeded it. */
    if (ioctl(fd, RNDRESEEDCRNG) < 0 && errno != ENODATA) return 1;
    if (argc == 3) {
        struct timeval now = { .tv_sec = (time_t)strtoll(argv[2], NULL, 10), .tv_usec = 0 };
        if (now.tv_sec > 0) settimeofday(&now, NULL);
    }
    return 0;
}
"""


RUN_HELPER = r"""
/* wbx-run ROOT UID GID SHARES NAME=VALUE... -- PROG ARGS: mount the task's read-only 9p
   shares (SHARES: TAG=PATH,... with PATH inside ROOT, or -), chroot to ROOT, cd /task, and
   exec PROG as UID:GID with no supplementary groups, no new privileges and only the given
   environment. One exec where env + start-stop-daemon + sh took three (and a /proc scan):
   under TCG every exec of a new guest costs translation time. The shares are mounted here,
   per task, because a mounted share blocks QEMU's migration (the snapshot templates). */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

static int mount_shares(const char *root, char *spec) {
    if (strcmp(spec, "-") == 0) return 0;
    for (char *item = strtok(spec, ","); item != NULL; item = strtok(NULL, ",")) {
        char *path_in_root = strchr(item, '='), path[4096];
        if (path_in_root == NULL || path_in_root[1] != '/' || strstr(path_in_root, "..")) return -1;
        *path_in_root++ = '\0';
        size_t base = strlen(root);
        if (snprintf(path, sizeof path, "%s%s", root, path_in_root) >= (int)sizeof path) return -1;
        for (char *p = path + base + 1; *p; p++) {
            if (*p != '/') continue;
            *p = '\0';
            if (mkdir(path, 0755) != 0 && errno != EEXIST) return -1;
            *p = '/';
        }
        if (mkdir(path, 0755) != 0 && errno != EEXIST) return -1;
        if (mount(item, path, "9p", MS_RDONLY | MS_NOSUID | MS_NODEV,
                  "@SHARE_OPTIONS@") != 0) return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 7) return 125;
    uid_t uid = (uid_t)strtoul(argv[2], NULL, 10);
    gid_t gid = (gid_t)strtoul(argv[3], NULL, 10);
    if (uid == 0 || gid == 0) return 125;
    if (mount_shares(argv[1], argv[4]) != 0) {
        perror("wbx-run: mount");
        return 125;
    }
    if (chroot(argv[1]) != 0 || chdir("/task") != 0) {
        perror("wbx-run: chroot");
        return 125;
    }
    if (clearenv() != 0) return 125;
    int i = 5;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++)
        if (putenv(argv[i]) != 0) return 125;
    if (i + 1 >= argc) return 125;
    if (setgroups(0, NULL) || setresgid(gid, gid, gid) || setresuid(uid, uid, uid)
        || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) {
        perror("wbx-run");
        return 125;
    }
    if (getuid() != uid || geteuid() != uid || getegid() != gid) return 125;
    execvp(argv[i + 1], argv + i + 1);
    int err = errno;
    fprintf(stderr, "sh: %s: %s\n", argv[i + 1], err == ENOENT ? "not found" : strerror(err));
    return err == ENOENT ? 127 : 126;
}
""".replace("@SHARE_OPTIONS@", SHARE_OPTIONS)
