"""Benchmarks: the report on the pipeline's test molecules and PPO throughput against TRL."""
