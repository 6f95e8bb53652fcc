"""wasmbox benchmarks: per-tier measurements and the suite that tabulates them (`suite.main`)."""
