"""Benchmarks: speed measured side by side against a reference."""
