"""Benchmarks: run each as python -m benchmarks.NAME; one JSON line per measurement."""
