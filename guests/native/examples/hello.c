/* The smallest useful native task: greet, and write a result for the sandbox to collect. */
#include <stdio.h>

int main(void) {
    puts("hello from a container");
    FILE *f = fopen("/task/output/result.json", "w");
    if (f == NULL) return 1;
    fputs("{\"hello\": \"world\"}", f);
    return fclose(f) == 0 ? 0 : 1;
}
