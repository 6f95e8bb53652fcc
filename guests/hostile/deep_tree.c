/*
 * deep_tree: builds a chain of directories /task/output/dddddddd/dddddddd/...
 * one directory fd at a time (mkdirat/openat, so the guest never needs a long
 * path), `levels` deep (default 1100: about 9,900 bytes of path on the host,
 * past PATH_MAX). Then, if `bytes` > 0, writes a file of that many bytes at
 * the bottom. Then, if `spin` is set, loops forever (so only a check made
 * while it runs can stop it). Input: {"levels": N, "bytes": B, "spin": 0|1}.
 * stdout: "deep_tree reached L", "deep_tree wrote B". Exits 0.
 */
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "task.h"

#define NAME "dddddddd"

static char chunk[1 << 16];

int main(void) {
    long long levels = 1100, bytes = 0, spin = 0;
    char *input = task_read_input();
    if (input) {
        task_json_int(input, "levels", &levels);
        task_json_int(input, "bytes", &bytes);
        task_json_int(input, "spin", &spin);
    }
    int fd = open("/task/output", O_RDONLY | O_DIRECTORY);
    long long reached = 0;
    while (fd >= 0 && reached < levels) {
        if (mkdirat(fd, NAME, 0755) != 0) break;
        int next = openat(fd, NAME, O_RDONLY | O_DIRECTORY);
        if (next < 0) break;
        close(fd);
        fd = next;
        reached++;
    }
    printf("deep_tree reached %lld\n", reached);
    fflush(stdout);
    if (bytes > 0 && fd >= 0) {
        int out = openat(fd, "big.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        long long written = 0;
        memset(chunk, 'x', sizeof chunk);
        while (out >= 0 && written < bytes) {
            long long n = bytes - written < (long long)sizeof chunk ? bytes - written
                                                                  : (long long)sizeof chunk;
            ssize_t w = write(out, chunk, (size_t)n);
            if (w <= 0) break;
            written += w;
        }
        printf("deep_tree wrote %lld\n", written);
        fflush(stdout);
    }
    volatile unsigned long spins = 0;
    while (spin) spins++;
    return 0;
}
