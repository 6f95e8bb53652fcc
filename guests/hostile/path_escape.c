/*
 * path_escape: tries to open paths outside the preopens for reading.
 * stdout: one line per attempt,
 *   "path_escape DENIED errno=N path=P"  or  "path_escape ALLOWED path=P".
 * Exit 0 if every attempt was denied, 1 if any succeeded.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

static const char *const paths[] = {
    "/task/../../etc/passwd",
    "/etc/passwd",
    "../etc/passwd",
    "/task/output/../../etc/hostname",
    "/proc/self/environ",
    "/",
};

int main(void) {
    int allowed = 0;
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        errno = 0;
        int fd = open(paths[i], O_RDONLY);
        if (fd < 0) {
            printf("path_escape DENIED errno=%d path=%s\n", errno, paths[i]);
        } else {
            printf("path_escape ALLOWED path=%s\n", paths[i]);
            close(fd);
            allowed++;
        }
    }
    return allowed ? 1 : 0;
}
