"""Benchmark harness (not part of the installed package): run from the repository root with
``python -m benchmarks.train_step``, ``python -m benchmarks.report`` and ``python -m benchmarks.kernels``.

This file imports nothing on purpose: the Unsloth worker must import ``unsloth`` before ``torch``.
"""
