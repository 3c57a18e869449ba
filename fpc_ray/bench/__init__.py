"""Benchmarks: commands that measure fpc-ray against a baseline in one run and print the ratio."""
