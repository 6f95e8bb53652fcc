/*
 * write_input: tries to open /task/input.json for writing (without truncating)
 * and to create /task/evil.txt. /task is a read-only preopen, so both must fail.
 * stdout: one line per attempt, "write_input DENIED errno=N" or
 * "write_input ALLOWED" (the path goes to stderr). Exit 0 if all denied, else 1.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int attempt(const char *path, int flags) {
    errno = 0;
    int fd = open(path, flags, 0644);
    if (fd < 0) {
        int e = errno;
        printf("write_input DENIED errno=%d\n", e);
        fprintf(stderr, "write_input: %s: %s\n", path, strerror(e));
        return 0;
    }
    printf("write_input ALLOWED\n");
    fprintf(stderr, "write_input: %s: opened for writing!\n", path);
    close(fd);
    return 1;
}

int main(void) {
    int allowed = 0;
    allowed += attempt("/task/input.json", O_WRONLY);
    allowed += attempt("/task/evil.txt", O_WRONLY | O_CREAT | O_TRUNC);
    return allowed ? 1 : 0;
}
