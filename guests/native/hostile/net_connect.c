/* Try to reach the outside world; the exit code is the errno of connect().
 *
 * It refuses to send anything when the sandbox has a route (exit 3), so a broken network
 * guard makes the test fail without any packet leaving the machine. 192.0.2.1 is TEST-NET-1
 * (RFC 5737): documentation only, never routed. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int has_route(void) {
    FILE *f = fopen("/proc/net/route", "r");
    if (f == NULL) return 0;
    char line[512];
    int lines = 0;
    while (fgets(line, sizeof line, f)) lines++;
    fclose(f);
    return lines > 1; /* the first line is the header */
}

int main(void) {
    if (has_route()) {
        puts("a route exists: the network is not isolated");
        return 3;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        printf("socket: %s\n", strerror(errno));
        return errno;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(80)};
    inet_pton(AF_INET, "192.0.2.1", &addr.sin_addr);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        printf("connect: %s\n", strerror(errno));
        return errno;
    }
    puts("connected");
    return 0;
}
