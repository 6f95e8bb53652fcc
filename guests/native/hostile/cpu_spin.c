/* Spin forever: only a deadline stops this. */
int main(void) {
    volatile unsigned long n = 0;
    for (;;) n++;
}
