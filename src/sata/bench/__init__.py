"""Measurements of ``sata`` against conventional attention and the paper's formulation.

- :mod:`sata.bench.baselines`: SDPA with a preallocated KV cache, and the paper's formulation.
- :mod:`sata.bench.timing`: repeated timings (median, IQR), peak memory, machine limits.
- :mod:`sata.bench.decode`, :mod:`sata.bench.prefill`: sweeps over context length.
- :mod:`sata.bench.targets`: the performance targets (issue 4), PASS/FAIL.
- :mod:`sata.bench.mqar`: multi-query associative recall, accuracy against state size.
- :mod:`sata.bench.cli`: ``sata bench decode|prefill|targets|all|mqar``.
"""
