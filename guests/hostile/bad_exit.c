/* bad_exit: exits with status 42 via exit(). */
#include <stdlib.h>

int main(void) {
    exit(42);
}
