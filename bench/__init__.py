"""Benchmarks and test infrastructure (the misbehaving origin server); not installed."""
