/* exit_code: exits with the integer in input {"code":N} (default 3). */
#include <stdlib.h>

#include "task.h"

int main(void) {
    long long code = 3;
    char *in = task_read_file(TASK_INPUT_PATH, NULL);
    if (in) {
        task_json_int(in, "code", &code);
        free(in);
    }
    exit((int)code);
}
