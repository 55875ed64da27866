"""Benchmarks of the engine and the gRPC API against transformers baselines in one run."""
