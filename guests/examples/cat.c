/* cat: copies each file named in argv to stdout; exit 1 (with errno on stderr) if one fails. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    int failed = 0;
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (f == NULL) {
            fprintf(stderr, "cat: %s: errno=%d %s\n", argv[i], errno, strerror(errno));
            failed = 1;
            continue;
        }
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
            fwrite(buf, 1, n, stdout);
        }
        fclose(f);
    }
    return failed;
}
