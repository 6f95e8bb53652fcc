/* Dereference NULL: the kernel's SIGSEGV ends us. */
int main(void) {
    volatile int *p = 0;
    return *p;
}
