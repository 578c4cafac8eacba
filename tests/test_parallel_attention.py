"""The attention entry point under sequence parallelism, on random tensors: every layout equals one process.

One set of 4 gloo processes runs Ulysses-2 (two replicas), Ring-2 (two replicas) and USP 2x2 over
15 tokens (no degree divides them), with and without replicated text and a padded text mask; rank 0
compares the gathered output with :func:`attention` over the whole sequence (float32, <= 1e-5).
"""

from __future__ import annotations

import json

import pytest
import torch

from diffgen.layers.attention import _text_lengths, joint_sdpa, sdpa, sdpa_by_text_length
from diffgen.testing.parallel import ATTENTION_LAYOUTS, ATTENTION_TEXTS

TOLERANCE = 1e-5
@pytest.fixture(scope="module")
def attention_results(tmp_path_factory):
    from diffgen.testing.parallel import run_attention_cases, spawn

    out = tmp_path_factory.mktemp("attention") / "results.json"
    spawn(4, run_attention_cases, str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", [f"{layout}/{text}" for layout in ATTENTION_LAYOUTS for text in ATTENTION_TEXTS])
def test_sharded_attention_equals_one_process(attention_results, case):
    assert attention_results[case] <= TOLERANCE


@pytest.mark.parametrize("rows,expected", [
    ([[1, 1, 1, 0], [1, 1, 0, 0]], [3, 2]),  # end-padded: each row's text length
    ([[1, 1, 1, 1], [1, 0, 0, 0]], [4, 1]),
    ([[1, 0, 1, 0], [1, 1, 0, 0]], None),  # a hole: only the masked call is right
    ([[1, 1, 0, 0], [0, 0, 0, 0]], None),  # a row without text
])
def test_text_lengths_are_read_only_from_end_padded_masks(rows, expected):
    for dtype in (torch.long, torch.bool):
        assert _text_lengths(torch.tensor(rows, dtype=dtype)) == expected


@pytest.mark.parametrize("lengths", [[6, 2, 4], [4, 2, 4]], ids=["three-lengths", "rows-0-and-2-alike"])
def test_text_cut_to_its_length_equals_the_masked_call(lengths):
    """The packed path CUDA takes for padded text (each row's real text keys, no mask) equals masked SDPA."""
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(3, 11, 2, 8, generator=generator)
    text_kv = tuple(torch.randn(3, 6, 2, 8, generator=generator) for _ in range(2))
    kv = tuple(torch.randn(3, 7, 2, 8, generator=generator) for _ in range(2))
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    expected = sdpa(query, torch.cat([text_kv[0], kv[0]], 1), torch.cat([text_kv[1], kv[1]], 1),
                    torch.cat([mask, mask.new_ones(3, 7)], 1))
    assert (sdpa_by_text_length(query, text_kv, kv, lengths) - expected).abs().max().item() <= 1e-6
    assert (joint_sdpa(query, text_kv, kv, mask) - expected).abs().max().item() == 0  # CPU: the masked call itself
