"""Benchmarks: each script prints its figures; run with `make bench`."""
