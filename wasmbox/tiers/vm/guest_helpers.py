"""Internal: the sources of the guest's static C helpers, ``wbx-seed`` and ``wbx-run``.

`images` compiles them into the initramfs; `guest` describes what they do for a task.
"""

from __future__ import annotations

from wasmbox.tiers.vm.guest_init import SHARE_OPTIONS

SEED_HELPER = r"""
/* wbx-seed HEX [TIME]: credit 64 bytes of host entropy to the guest RNG and force a reseed,
   so a guest restored from a snapshot stops sharing its random stream with its siblings;
   then set the clock to TIME (seconds since the epoch; one exec fewer than `date -s`).
   wbx-seed -u ROOT: read the task's bundle from stdin (the task port), a length line and a
   ustar of exactly that length (never read to EOF: QEMU's socket chardev may drop what a
   host that hung up left unread), and unpack it under ROOT. One exec of a binary the guest
   just ran to arm itself, where `head | tar` took two of busybox: under TCG every new code
   path costs translation time in each restored guest. The bundle may hold only directories
   and regular files under job/ and task/: an absolute name, a "." or ".." component, a link
   or device, a size past the announced length, a path through a symbolic link, or a file
   that already exists is refused (exit 3). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static unsigned char in[65536];
static size_t in_pos, in_len;

/* The port reads EOF while the host is not connected: wait and read again. */
static int fill(void) {
    for (;;) {
        ssize_t n = read(0, in, sizeof in);
        if (n > 0) { in_pos = 0; in_len = (size_t)n; return 0; }
        if (n < 0 && errno != EINTR) return -1;
        if (n == 0) { struct timespec t = {0, 20000000}; nanosleep(&t, NULL); }
    }
}

/* The next non-empty line, without its newline, into buf (NUL-terminated). */
static int get_line(char *buf, size_t size) {
    size_t len = 0;
    for (;;) {
        if (in_pos == in_len && fill() != 0) return -1;
        char c = (char)in[in_pos++];
        if (c == '\n') {
            if (len == 0) continue;
            buf[len] = '\0';
            return 0;
        }
        if (len + 1 >= size) return -1;
        buf[len++] = c;
    }
}

/* Exactly n bytes into buf (or thrown away when buf is NULL). */
static int take(unsigned char *buf, size_t n) {
    while (n > 0) {
        if (in_pos == in_len && fill() != 0) return -1;
        size_t k = in_len - in_pos < n ? in_len - in_pos : n;
        if (buf != NULL) { memcpy(buf, in + in_pos, k); buf += k; }
        in_pos += k;
        n -= k;
    }
    return 0;
}

static int nibble(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

static int seed(int argc, char **argv) {
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

static unsigned long long octal(const char *field, size_t size) {
    unsigned long long v = 0;
    size_t i = 0;
    while (i < size && field[i] == ' ') i++;
    for (; i < size && field[i] >= '0' && field[i] <= '7'; i++) {
        if (v >> 60) return ~0ULL;
        v = v * 8 + (unsigned long long)(field[i] - '0');
    }
    return v;
}

/* A name the bundle may hold: job or task, or a path under them of plain components. */
static int safe_name(const char *name) {
    if (strcmp(name, "job") != 0 && strcmp(name, "task") != 0
        && strncmp(name, "job/", 4) != 0 && strncmp(name, "task/", 5) != 0) return 0;
    for (const char *p = name; *p; ) {
        const char *slash = strchr(p, '/');
        size_t len = slash ? (size_t)(slash - p) : strlen(p);
        if (len == 0 || (len == 1 && p[0] == '.') || (len == 2 && p[0] == '.' && p[1] == '.'))
            return 0;
        p += len + (slash != NULL);
        if (slash != NULL && *p == '\0') return 0;
    }
    return 1;
}

/* The directory holding `name` (relative to rootfd), opened without following any link;
   `base` is set to the last component. */
static int open_parent(int rootfd, char *name, char **base) {
    char *slash = strrchr(name, '/');
    if (slash == NULL) {
        *base = name;
        return fcntl(rootfd, F_DUPFD_CLOEXEC, 0);
    }
    *slash = '\0';
    *base = slash + 1;
    struct open_how how = {
        .flags = O_PATH | O_DIRECTORY | O_CLOEXEC,
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    int fd = (int)syscall(SYS_openat2, rootfd, name, &how, sizeof how);
    *slash = '/';
    return fd;
}

static int unpack(const char *root) {
    char line[32], path[4096], name[256];
    unsigned char h[512];
    if (get_line(line, sizeof line) != 0 || line[0] == '\0') return 3;
    unsigned long long left = 0;
    for (const char *p = line; *p; p++) {
        if (*p < '0' || *p > '9' || left > (1ULL << 40)) return 3;
        left = left * 10 + (unsigned long long)(*p - '0');
    }
    int rootfd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0) return 3;
    umask(0);
    while (left >= sizeof h) {
        if (take(h, sizeof h) != 0) return 3;
        left -= sizeof h;
        unsigned sum = 0, zero = 1;
        for (size_t i = 0; i < sizeof h; i++) {
            sum += (i >= 148 && i < 156) ? ' ' : h[i];
            zero &= h[i] == 0;
        }
        if (zero) break;
        if (memcmp(h + 257, "ustar", 5) != 0 || octal((char *)h + 148, 8) != sum) return 3;
        size_t plen = strnlen((char *)h + 345, 155), nlen = strnlen((char *)h, 100);
        if (plen + 1 + nlen >= sizeof name) return 3;
        memcpy(name, h + 345, plen);
        if (plen) name[plen++] = '/';
        memcpy(name + plen, h, nlen);
        name[plen + nlen] = '\0';
        unsigned long long size = octal((char *)h + 124, 12);
        mode_t mode = (mode_t)(octal((char *)h + 100, 8) & 0777);
        char type = (char)h[156];
        if (type == '5' && plen + nlen > 0 && name[plen + nlen - 1] == '/')
            name[plen + nlen - 1] = '\0';
        if (!safe_name(name) || (type != '5' && type != '0' && type != '\0')) return 3;
        unsigned long long padded = (size + 511) / 512 * 512;
        if (size > left || padded > left || (type == '5' && size != 0)) return 3;
        char *base;
        int dir = open_parent(rootfd, name, &base);
        if (dir < 0) return 3;
        if (type == '5') {
            struct stat st;
            int bad = mkdirat(dir, base, mode) != 0
                && (errno != EEXIST || fstatat(dir, base, &st, AT_SYMLINK_NOFOLLOW) != 0
                    || !S_ISDIR(st.st_mode));
            close(dir);
            if (bad) return 3;
            continue;
        }
        int fd = openat(dir, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
        close(dir);
        if (fd < 0) return 3;
        for (unsigned long long todo = size; todo > 0; ) {
            size_t k = todo < sizeof path ? (size_t)todo : sizeof path;
            if (take((unsigned char *)path, k) != 0 || write(fd, path, k) != (ssize_t)k) {
                close(fd);
                return 3;
            }
            todo -= k;
        }
        if (close(fd) != 0 || take(NULL, (size_t)(padded - size)) != 0) return 3;
        left -= padded;
    }
    close(rootfd);
    return take(NULL, (size_t)left) == 0 ? 0 : 3;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "-u") == 0) return unpack(argv[2]);
    return seed(argc, argv);
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
