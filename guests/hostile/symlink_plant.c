/*
 * symlink_plant: tries to plant symlinks in /task/output that point outside
 * the sandbox. Whether the runtime allows creating them or not, the host must
 * refuse to collect such links. stdout: one line per attempt,
 *   "symlink_plant CREATED link=L target=T" or
 *   "symlink_plant DENIED errno=N link=L target=T". Always exits 0.
 */
#include <errno.h>
#include <stdio.h>
#include <unistd.h>

static void attempt(const char *target, const char *link) {
    errno = 0;
    if (symlink(target, link) == 0)
        printf("symlink_plant CREATED link=%s target=%s\n", link, target);
    else
        printf("symlink_plant DENIED errno=%d link=%s target=%s\n", errno, link, target);
}

int main(void) {
    attempt("/etc/passwd", "/task/output/link");
    attempt("../../../../etc/passwd", "/task/output/rel");
    return 0;
}
