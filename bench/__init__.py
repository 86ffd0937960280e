"""Benchmarks for loraserve (run as modules, e.g. `python -m bench.engine_bench`)."""
