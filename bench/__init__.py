"""rnnfast benchmarks: `python -m bench` (CPU) and `python -m bench.gpu` (GPU grid)."""
