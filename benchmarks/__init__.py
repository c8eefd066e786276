"""Benchmarks of loopcoder on this machine: `python benchmarks/run.py` (see benchmarks/README.md)."""
