/*
 * output_count_flood: creates /task/output/f000000 .. f099999, each a few
 * bytes, ignoring errors, then exits 0. The host must cap the file count.
 */
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(void) {
    char path[64];
    unsigned long failures = 0;
    for (int i = 0; i < 100000; i++) {
        snprintf(path, sizeof path, "/task/output/f%06d", i);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) { failures++; continue; }
        if (write(fd, "x\n", 2) < 0) failures++;
        close(fd);
    }
    fprintf(stderr, "output_count_flood: done, %lu failures\n", failures);
    return 0;
}
