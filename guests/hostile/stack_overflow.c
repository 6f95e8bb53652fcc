/*
 * stack_overflow: unbounded recursion with a volatile 1 KiB local array per
 * frame. Linked with --stack-first, the shadow stack runs off the bottom of
 * linear memory, so the expected outcome is an out-of-bounds memory trap (or
 * the engine's native call-stack-exhausted trap, whichever comes first).
 */
#include <stdio.h>

#pragma clang diagnostic ignored "-Winfinite-recursion"

static unsigned long recurse(unsigned long depth) {
    volatile unsigned char frame[1024];
    frame[depth % sizeof frame] = (unsigned char)depth;
    frame[0] = (unsigned char)(depth >> 8);
    /* Use the result after the call so this is not a tail call. */
    return recurse(depth + 1) + frame[depth % sizeof frame] + frame[0];
}

int main(void) {
    printf("stack_overflow: result %lu\n", recurse(0)); /* never reached */
    return 0;
}
