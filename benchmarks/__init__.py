"""Benchmark harness for async_ckpt: see benchmarks/README.md."""
