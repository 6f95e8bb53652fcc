/*
 * memory_bomb: allocates 1 MiB chunks forever, touching every page so the
 * memory is really committed. When malloc finally returns NULL (linear memory
 * growth refused by the host) it calls abort(), which traps in wasm.
 */
#include <stdio.h>
#include <stdlib.h>

#define CHUNK (1u << 20)

int main(void) {
    void *volatile keep = NULL; /* chain of chunks so nothing is elided */
    unsigned long mib = 0;
    for (;;) {
        void **chunk = malloc(CHUNK);
        if (!chunk) {
            fprintf(stderr, "memory_bomb: malloc failed after %lu MiB, aborting\n", mib);
            abort();
        }
        volatile unsigned char *bytes = (volatile unsigned char *)chunk;
        for (unsigned i = 0; i < CHUNK; i += 4096) bytes[i] = (unsigned char)(i ^ mib);
        chunk[0] = keep;
        keep = chunk;
        mib++;
    }
}
