"""Benchmarks of the project (`python -m benchmarks.<name> --help`); results in benchmarks/results/."""
