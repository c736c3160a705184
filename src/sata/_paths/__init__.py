"""The execution paths of :func:`sata.sata_attention`: each computes the same thing (``MATH.md`` section 3).

Every path has one signature, ``path(query, key, value, spec, mask, state, need_state, inplace,
tuning) -> (output [..., Hq, Lq, Ev], state^T [..., Hkv, F, D] contiguous, or None)``; :mod:`sata.ops`
chooses one per call (``select_path``) and turns the F-major state into a :class:`~sata.SATAState`.

Modules:
    tuning     chunk, block and segment sizes; what ``sata.ops.force_path`` may override.
    run        one call's constants (``Run``) and the primitives the PyTorch paths compose;
               ``torch_path`` adapts a PyTorch path to the signature above.
    recurrent  causal, token by token (single tokens under autograd / on CUDA).
    chunked    causal, chunks of scores plus the state before each chunk (prefill, training).
    parallel   non-causal: the state of all keys, then every query reads it.
    quadratic  ``T_P`` on the score matrix, when that costs less than features.
    autograd   the backward of block-wise paths: recompute each block from its start state.
    kernel     glue to the fused CPU kernels: ``decode`` and ``prefill`` paths, and a kernel block
               for ``chunked`` without autograd.
"""
