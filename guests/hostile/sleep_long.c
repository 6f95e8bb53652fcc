/*
 * sleep_long: blocks in WASI poll_oneoff, which no epoch check can interrupt.
 *
 *   (no args)        sleep(6): one relative monotonic clock subscription
 *   abs_mono MS      clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, now + MS)
 *   abs_real MS      clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, now + MS)
 *   rel MS           nanosleep(MS)
 *
 * With a duration it prints the milliseconds the guest's own monotonic clock saw pass, so
 * a test can check that a wait the deadline allows is really waited.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct timespec at(long long ns) {
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    return ts;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        sleep(6);
        puts("slept 6 s");
        return 0;
    }
    long long ms = atoll(argv[2]);
    long long start = now_ns(CLOCK_MONOTONIC);
    int rc;
    if (strcmp(argv[1], "abs_mono") == 0) {
        struct timespec t = at(start + ms * 1000000LL);
        rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
    } else if (strcmp(argv[1], "abs_real") == 0) {
        struct timespec t = at(now_ns(CLOCK_REALTIME) + ms * 1000000LL);
        rc = clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &t, NULL);
    } else {
        struct timespec t = at(ms * 1000000LL);
        rc = nanosleep(&t, NULL);
    }
    printf("rc=%d elapsed_ms=%lld\n", rc, (now_ns(CLOCK_MONOTONIC) - start) / 1000000LL);
    return rc == 0 ? 0 : 1;
}
