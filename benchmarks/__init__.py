"""Benchmarks of the training system (run as modules, e.g. `python -m benchmarks.layouts`)."""
