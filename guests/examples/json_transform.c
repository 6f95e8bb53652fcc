/*
 * json_transform: reads {"xs":[1,2,3]} from /task/input.json and writes
 * {"sum":6,"count":3,"max":3} to /task/output/result.json.
 * An empty array gives {"sum":0,"count":0,"max":null}.
 * Exit 2 if the input is missing or "xs" is not a flat array of integers.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "task.h"

int main(void) {
    char *in = task_read_input();
    if (!in) return 2;
    const char *p = task_json_find(in, "xs");
    if (!p || *p != '[') {
        fprintf(stderr, "json_transform: input has no \"xs\" array\n");
        return 2;
    }
    p = task_skip_ws(p + 1);
    long long sum = 0, max = 0, count = 0;
    if (*p == ']') {
        p++;
    } else {
        for (;;) {
            char *end;
            errno = 0;
            long long v = strtoll(p, &end, 10);
            if (end == p || errno == ERANGE) {
                fprintf(stderr, "json_transform: bad integer in \"xs\"\n");
                return 2;
            }
            if (__builtin_add_overflow(sum, v, &sum)) {
                fprintf(stderr, "json_transform: sum overflows int64\n");
                return 2;
            }
            if (count == 0 || v > max) max = v;
            count++;
            p = task_skip_ws(end);
            if (*p == ',') { p = task_skip_ws(p + 1); continue; }
            if (*p == ']') break;
            fprintf(stderr, "json_transform: expected ',' or ']' in \"xs\"\n");
            return 2;
        }
    }
    char out[160];
    if (count == 0)
        snprintf(out, sizeof out, "{\"sum\":0,\"count\":0,\"max\":null}");
    else
        snprintf(out, sizeof out, "{\"sum\":%lld,\"count\":%lld,\"max\":%lld}", sum, count, max);
    free(in);
    return task_write_result(out) == 0 ? 0 : 1;
}
