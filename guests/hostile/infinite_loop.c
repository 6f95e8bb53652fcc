/* infinite_loop: spins forever without any host calls. Must be stopped by fuel/epoch. */
int main(void) {
    volatile unsigned long counter = 0;
    for (;;) counter++;
}
