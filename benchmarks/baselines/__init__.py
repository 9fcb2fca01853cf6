"""The floor ext_proc processors the benchmarks compare epp with (tooling, not product code)."""
