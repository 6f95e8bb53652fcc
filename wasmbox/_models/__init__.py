"""Internal: the split parts of `wasmbox.models` (one module per concern).

Import from `wasmbox` (or `wasmbox.models`), never from here: these module names may change.
"""
