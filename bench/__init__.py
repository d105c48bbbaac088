"""Benchmarks: each measures its work beside a reference taken in the same run."""
