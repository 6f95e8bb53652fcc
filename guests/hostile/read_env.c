/*
 * read_env: prints every environment variable it can see (NAME=VALUE, one per
 * line) and exits 1 if HOME, PATH or WASMBOX_SECRET is set, else 0.
 */
#include <stdio.h>
#include <stdlib.h>

extern char **environ;

int main(void) {
    for (char **e = environ; e && *e; e++) printf("%s\n", *e);
    static const char *const leaky[] = {"HOME", "PATH", "WASMBOX_SECRET"};
    int leaked = 0;
    for (size_t i = 0; i < sizeof leaky / sizeof leaky[0]; i++) {
        if (getenv(leaky[i])) {
            fprintf(stderr, "read_env: %s is set\n", leaky[i]);
            leaked = 1;
        }
    }
    return leaked;
}
