/*
 * output_writer: writes /task/output/big.bin in 1 MiB chunks, `mib` of them
 * (input {"mib": N}, default 256), printing "output_writer wrote K" after
 * each chunk and "output_writer done" at the end. A cap checked only after
 * the run would let it finish; a check while it runs stops it early, and the
 * last line says how far it got.
 */
#include <fcntl.h>
#include <unistd.h>

#include "task.h"

static char chunk[1 << 20];

int main(void) {
    long long mib = 256;
    char *input = task_read_input();
    if (input) task_json_int(input, "mib", &mib);
    memset(chunk, 'y', sizeof chunk);
    int fd = open("/task/output/big.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return 1;
    for (long long i = 1; i <= mib; i++) {
        if (write(fd, chunk, sizeof chunk) != (ssize_t)sizeof chunk) return 2;
        printf("output_writer wrote %lld\n", i);
        fflush(stdout);
    }
    close(fd);
    printf("output_writer done\n");
    return 0;
}
