/*
 * fd_bomb: opens /task/input.json again and again and never closes it, trying to use up
 * the host process's file descriptors. After 1000 refusals in a row it reports how many
 * opens succeeded and the last errno, and exits 3; with "forever" it keeps trying until
 * it is stopped. With "cycle" it opens and closes 2000 times (a well-behaved guest) and
 * exits 0 if every open succeeded.
 */
#include <unistd.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "cycle") == 0) {
        for (int i = 0; i < 2000; i++) {
            int fd = open("/task/input.json", O_RDONLY);
            if (fd < 0 || close(fd) != 0) {
                printf("cycle %d failed: errno=%d\n", i, errno);
                return 1;
            }
        }
        puts("cycled 2000");
        return 0;
    }
    int forever = argc > 1 && strcmp(argv[1], "forever") == 0;
    unsigned long opened = 0, refused = 0;
    int last = 0;
    for (;;) {
        int fd = open("/task/input.json", O_RDONLY);
        if (fd >= 0) {
            opened++;
            refused = 0;
            continue;
        }
        last = errno;
        if (++refused >= 1000 && !forever) break;
    }
    printf("opened=%lu errno=%d emfile=%d\n", opened, last, last == EMFILE);
    return 3;
}
