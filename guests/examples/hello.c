/* hello: prints a greeting and writes result.json {"greeting":"hello"}. */
#include <stdio.h>

#include "task.h"

int main(void) {
    printf("hello from wasm\n");
    fflush(stdout);
    return task_write_result("{\"greeting\":\"hello\"}") == 0 ? 0 : 1;
}
