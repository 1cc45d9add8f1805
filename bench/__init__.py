"""Benchmarks that print tables (not timed tests): `python -m bench.<name>`."""
