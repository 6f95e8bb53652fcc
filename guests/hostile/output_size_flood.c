/*
 * output_size_flood: writes /task/output/big.bin in 1 MiB chunks up to 4 GiB,
 * ignoring write errors, then exits 0. The host must enforce an output quota.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define CHUNK (1u << 20)
#define CHUNKS 4096u /* 4096 * 1 MiB = 4 GiB */

static char chunk[CHUNK];

int main(void) {
    memset(chunk, 0x5A, sizeof chunk);
    int fd = open("/task/output/big.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        perror("output_size_flood: open /task/output/big.bin");
        return 0;
    }
    unsigned long failures = 0;
    for (unsigned i = 0; i < CHUNKS; i++) {
        if (write(fd, chunk, sizeof chunk) < 0) failures++;
    }
    close(fd);
    fprintf(stderr, "output_size_flood: done, %lu failed writes\n", failures);
    return 0;
}
