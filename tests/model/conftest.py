"""Helpers shared by the scan and mixer tests: an error measure and a tiny Seshu."""

import torch

from fedem.model.seshu import SeshuSize


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error, in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


class TinyVocab:
    """Just enough of a tokenizer for `seshu_config`: a length and the special ids."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 97


TINY = SeshuSize(hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8, n_groups=2, chunk_size=8)
