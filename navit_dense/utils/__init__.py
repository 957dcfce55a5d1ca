"""Small utilities shared by the engine and the tools (benchmarking helpers, host-sync
counting, CPU malloc settings)."""
