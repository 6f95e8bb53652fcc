/* fsprobe r|w|c PATH: open PATH for reading, writing or creation; exit code = errno (0 = ok). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fputs("usage: fsprobe r|w|c PATH\n", stderr);
        return 64;
    }
    int flags = argv[1][0] == 'r' ? O_RDONLY : argv[1][0] == 'w' ? O_WRONLY : O_WRONLY | O_CREAT;
    int fd = open(argv[2], flags, 0644);
    if (fd < 0) {
        printf("%s: %s\n", argv[2], strerror(errno));
        return errno;
    }
    if (flags != O_RDONLY && write(fd, "x", 1) != 1) {
        printf("%s: write: %s\n", argv[2], strerror(errno));
        return errno;
    }
    printf("%s: opened\n", argv[2]);
    close(fd);
    return 0;
}
