/* Fork until the pids limit says no; report how far it got. Children just wait. */
#include <errno.h>
#include <stdio.h>
#include <unistd.h>

int main(void) {
    int forked = 0, refused = 0;
    for (int i = 0; i < 5000; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            for (;;) pause();
        }
        if (pid < 0) {
            refused++;
        } else {
            forked++;
        }
    }
    printf("forked=%d refused=%d\n", forked, refused);
    return 0; /* the pid namespace dies with us, and every child with it */
}
