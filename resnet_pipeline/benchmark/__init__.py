"""Benchmarks that time our code against a reference in the same run."""
