"""rnnfast benchmarks: `python -m bench` on CPU or GPU (see bench/__main__.py)."""
