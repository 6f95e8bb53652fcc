"""The default tier: WASI modules in-process under wasmtime."""

from wasmbox.tiers.wasm.tier import WasmTier

__all__ = ["WasmTier"]
