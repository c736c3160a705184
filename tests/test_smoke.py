import pytest
import torch

import sata


@pytest.mark.parametrize("is_causal", [False, True], ids=["noncausal", "causal"])
def test_matches_oracle_float64(is_causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 100, 8, dtype=torch.float64, generator=g) for _ in range(3))
    y = sata.sata_attention(q, k, v, n_taylor=4, is_causal=is_causal)
    ref = sata.naive_sata_attention(q, k, v, n_taylor=4, is_causal=is_causal)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
