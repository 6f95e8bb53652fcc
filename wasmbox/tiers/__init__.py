"""Isolation tiers behind one protocol (see `wasmbox.tiers.base`)."""
