"""Small utilities shared by tools (benchmarking helpers)."""
