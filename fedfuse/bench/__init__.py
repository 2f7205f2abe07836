"""Benchmarks run by ``fedfuse bench …``: they print ratios against baselines measured in the same run."""
