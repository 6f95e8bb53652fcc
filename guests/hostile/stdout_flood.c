/*
 * stdout_flood: writes 64 KiB blocks to stdout 100000 times (~6.5 GB),
 * ignoring errors, then exits 0. The host must cap captured output.
 */
#include <string.h>
#include <unistd.h>

static char block[64 * 1024];

int main(void) {
    memset(block, 'A', sizeof block);
    for (size_t i = 0; i < sizeof block; i += 64) block[i] = '\n';
    for (int i = 0; i < 100000; i++) {
        ssize_t r = write(1, block, sizeof block);
        (void)r;
    }
    return 0;
}
