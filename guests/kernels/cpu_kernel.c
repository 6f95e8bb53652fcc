/*
 * cpu_kernel: deterministic CPU-bound benchmark kernel.
 *
 * Usage: cpu_kernel [ITERATIONS]   (default 40000000, ~0.2 s native at -O2)
 *
 * Each iteration mixes a 64-bit state with a data-dependent slot of a 64 KiB
 * table (loads + stores + multiplies), so the work cannot be folded away and
 * exercises both ALU and linear memory. Only fixed-width unsigned arithmetic
 * is used, so native and wasm32-wasi builds print the same checksum.
 *
 * Output (stdout): "cpu_kernel iterations=N checksum=XXXXXXXXXXXXXXXX\n"
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define TABLE_SLOTS 8192u /* 8192 * 8 bytes = 64 KiB */
#define DEFAULT_ITERATIONS 40000000ull

static uint64_t table[TABLE_SLOTS];

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

int main(int argc, char **argv) {
    uint64_t iterations = DEFAULT_ITERATIONS;
    if (argc > 1) {
        char *end;
        unsigned long long v = strtoull(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0') {
            fprintf(stderr, "usage: %s [ITERATIONS]\n", argv[0]);
            return 2;
        }
        iterations = (uint64_t)v;
    }

    uint64_t seed = UINT64_C(0x0123456789ABCDEF);
    for (uint32_t i = 0; i < TABLE_SLOTS; i++) table[i] = splitmix64(&seed);

    uint64_t h = UINT64_C(0xCBF29CE484222325);
    for (uint64_t i = 0; i < iterations; i++) {
        uint32_t slot = (uint32_t)(h >> 51) & (TABLE_SLOTS - 1);
        uint64_t t = table[slot];
        h ^= t + i;
        h *= UINT64_C(0x100000001B3);
        h = (h << 13) | (h >> 51);
        table[slot] = t ^ h;
    }

    uint64_t checksum = h;
    for (uint32_t i = 0; i < TABLE_SLOTS; i++) checksum = (checksum ^ table[i]) * UINT64_C(0x100000001B3);

    printf("cpu_kernel iterations=%" PRIu64 " checksum=%016" PRIx64 "\n", iterations, checksum);
    return 0;
}
