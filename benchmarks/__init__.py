"""Load drivers and the figures they produce (see benchmarks/README.md)."""
