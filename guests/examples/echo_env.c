/* echo_env: prints each env var as NAME=VALUE, then each argv on its own line. */
#include <stdio.h>

extern char **environ;

int main(int argc, char **argv) {
    for (char **e = environ; e && *e; e++) printf("%s\n", *e);
    for (int i = 0; i < argc; i++) printf("%s\n", argv[i]);
    return 0;
}
