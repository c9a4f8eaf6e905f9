"""Processes for tests and benchmarks."""
