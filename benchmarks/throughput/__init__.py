"""Throughput benchmarks; run them through benchmarks/bench.py."""
