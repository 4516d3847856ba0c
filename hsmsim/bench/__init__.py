"""Benchmarks (`make bench-*`): throughput ratios against references measured in the same run."""
