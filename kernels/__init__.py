"""Triton kernels for rnnfast, installed as ``rnnfast.kernels``."""
