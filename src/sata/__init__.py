"""sata: softmax attention at constant cost per token via symmetry-aware Taylor approximation.

Public API::

    sata.sata_attention(q, k, v, n_taylor=3, is_causal=..., state=..., return_state=...)
    sata.naive_sata_attention(...)          # the O(n^2) oracle
    sata.SATAState                          # explicit, immutable streaming state
    sata.taylor_features(x, n_taylor)       # phi(x), <phi(q), phi(k)> = T_P(scale q.k)
    sata.state_size / feature_dim / flops_per_token / get_basis
    sata.set_memory_budget / memory_budget
"""

from .basis import TaylorBasis, feature_dim, flops_per_token, get_basis, monomial_counts, state_size
from .budget import MemoryBudgetError, get_memory_budget, memory_budget, set_memory_budget
from .features import taylor_exp, taylor_features
from .naive import naive_sata_attention
from .ops import accumulate_state, sata_attention
from .state import SATAState, StateFileError

__version__ = "0.2.0"

__all__ = [
    "accumulate_state",
    "MemoryBudgetError",
    "SATAState",
    "StateFileError",
    "TaylorBasis",
    "feature_dim",
    "flops_per_token",
    "get_basis",
    "get_memory_budget",
    "memory_budget",
    "monomial_counts",
    "naive_sata_attention",
    "sata_attention",
    "set_memory_budget",
    "state_size",
    "taylor_exp",
    "taylor_features",
]
