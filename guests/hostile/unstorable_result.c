/*
 * unstorable_result: writes a /task/output/result.json that is valid JSON but hard for a host
 * to keep: argv[1] = "nested N" writes N nested arrays ([[[...]]]), argv[1] = "surrogate"
 * writes a string holding a lone UTF-16 surrogate escape ("\ud800"). Exit 0.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    FILE *out = fopen("/task/output/result.json", "w");
    if (out == NULL) {
        perror("unstorable_result: result.json");
        return 1;
    }
    if (argc > 2 && strcmp(argv[1], "nested") == 0) {
        long depth = strtol(argv[2], NULL, 10);
        for (long i = 0; i < depth; i++) fputc('[', out);
        for (long i = 0; i < depth; i++) fputc(']', out);
    } else {
        fputs("{\"text\": \"\\ud800\"}", out);
    }
    return fclose(out) == 0 ? 0 : 1;
}
