"""Benchmarks: ``python -m bgtrain.bench {evaluate,loader,boostlu}``; each prints JSON lines."""
