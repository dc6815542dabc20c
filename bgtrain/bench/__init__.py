"""Benchmarks: ``python -m bgtrain.bench {evaluate,loader,boostlu,train}``; each prints JSON lines."""
