/*
 * fuel_burner: a finite but enormous computation (~1e11 loop iterations; hours
 * of CPU even natively) that prints a result only at the very end. Used to
 * check fuel/time limits on work that *would* eventually terminate.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>

int main(void) {
    const uint64_t outer = 100000, inner = 1000000; /* 1e11 iterations */
    uint64_t h = UINT64_C(0xCBF29CE484222325);
    for (uint64_t i = 0; i < outer; i++) {
        for (uint64_t j = 0; j < inner; j++) {
            h ^= j + i;
            h *= UINT64_C(0x100000001B3);
            h = (h << 7) | (h >> 57);
        }
    }
    printf("fuel_burner done result=%016" PRIx64 "\n", h);
    return 0;
}
