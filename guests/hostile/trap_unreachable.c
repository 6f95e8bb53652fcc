/* trap_unreachable: executes a wasm `unreachable` instruction via __builtin_trap(). */
int main(void) {
    __builtin_trap();
}
