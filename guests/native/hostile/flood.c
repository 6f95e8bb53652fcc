/* flood stdout|file: write without end to stdout or to /task/output/flood.bin. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>

int main(int argc, char **argv) {
    static char buf[1 << 16];
    memset(buf, 'A', sizeof buf);
    int fd = 1;
    if (argc > 1 && strcmp(argv[1], "file") == 0) {
        fd = open("/task/output/flood.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) return 2;
    }
    for (;;) {
        if (write(fd, buf, sizeof buf) < 0) return 1;
    }
}
