/*
 * secret_leak: tries every channel a result carries to get `secret` out:
 * stdout, stderr, result.json (as a JSON \u escape of its first character, so
 * the raw bytes never contain it, and as an object key), and a file named
 * "0-<secret>" holding it (its name, its contents, and any reason that names
 * the file, e.g. a size cap). Then ends as `end` says: "exit" (0),
 * "fail" (exit 3), "loop" (forever: a timeout), "trap" (unreachable).
 * Input: {"secret": "...", "end": "..."}.
 */
#include <fcntl.h>
#include <unistd.h>

#include "task.h"

int main(void) {
    char *input = task_read_input();
    if (!input) return 1;
    char *secret = task_json_string(input, "secret", NULL);
    char *end = task_json_string(input, "end", NULL);
    if (!secret || !*secret) return 1;
    printf("stdout says %s\n", secret);
    fprintf(stderr, "stderr says %s\n", secret);
    fflush(stdout);
    fflush(stderr);
    char buf[1024];
    snprintf(buf, sizeof buf, "{\"value\": \"\\u%04x%s\", \"%s\": 1}",
             (unsigned)(unsigned char)secret[0], secret + 1, secret);
    task_write_result(buf);
    snprintf(buf, sizeof buf, "/task/output/0-%s", secret);
    int fd = open(buf, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
        write(fd, secret, strlen(secret));
        close(fd);
    }
    if (end && strcmp(end, "fail") == 0) return 3;
    if (end && strcmp(end, "trap") == 0) __builtin_trap();
    volatile unsigned long spins = 0;
    while (end && strcmp(end, "loop") == 0) spins++;
    return 0;
}
