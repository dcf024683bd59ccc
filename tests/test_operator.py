"""The score-evict-merge operator on its own: registration, hand-computed cases, budget arithmetic, padding."""

from __future__ import annotations

import math

import pytest
import torch

from mmkv_compile import ops  # noqa: F401
from mmkv_compile.labels import Modality
from mmkv_compile.methods import build_method

INVALID, TEXT, IMAGE = int(Modality.INVALID), int(Modality.TEXT), int(Modality.IMAGE)


def _state(batch=1, kv_heads=2, seq=10, dim=8, groups=2, num_new=None, dtype=torch.float32):
    num_new = seq if num_new is None else num_new
    query = torch.randn(batch, kv_heads * groups, num_new, dim, dtype=dtype)
    keys = torch.randn(batch, kv_heads, seq, dim, dtype=dtype)
    values = torch.randn(batch, kv_heads, seq, dim, dtype=dtype)
    labels = torch.zeros(batch, kv_heads, seq, dtype=torch.int8)
    positions = torch.arange(seq).expand(batch, kv_heads, seq).contiguous()
    scores = torch.rand(batch, kv_heads, seq)
    weights = torch.ones(batch, kv_heads, seq)
    return query, keys, values, labels, positions, scores, weights


def _hand_state(query: torch.Tensor, keys: torch.Tensor):
    """Text slots at positions 0..S-1 with values equal to keys and no score history."""
    seq = keys.shape[2]
    labels = torch.zeros(1, keys.shape[1], seq, dtype=torch.int8)
    zeros = torch.zeros(1, keys.shape[1], seq)
    return query, keys, keys.clone(), labels, torch.arange(seq).view(1, 1, seq), zeros, torch.ones_like(zeros)


def _call(state, method, budget, prefill=True, scaling=None, **params):
    policy = build_method(method, **params).policy(budget).to_string()
    scaling = scaling if scaling is not None else state[0].shape[-1] ** -0.5
    return torch.ops.mmkv.score_evict_merge(*state, scaling, policy, prefill)


OPCHECK_CASES = [
    ("snapkv", 0.5, True, {"window": 3}),
    ("h2o", 6, False, {}),
    ("streaming_llm", 5, True, {"sinks": 2}),
    ("text_prior", 0.5, True, {"window": 3}),
]


@pytest.mark.parametrize("method,budget,prefill,params", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(method, budget, prefill, params):
    state = list(_state(num_new=None if prefill else 1))
    state[3][..., :4] = IMAGE
    policy = build_method(method, **params).policy(budget).to_string()
    tests = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if build_method(method, **params).policy(budget).static_output_length:
        tests.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.mmkv.score_evict_merge.default, (*state, 0.35, policy, prefill), test_utils=tests)


def test_opcheck_cache_append():
    q, k, v, labels, positions, scores, weights = _state(seq=6)
    new = _state(seq=2)
    args = (k, v, labels, positions, scores, weights, new[1], new[2], new[3], new[4])
    torch.library.opcheck(torch.ops.mmkv.cache_append.default, args)


def test_streaming_llm_keeps_sinks_and_the_most_recent():
    state = _state(seq=10)
    _, _, labels, positions, _, _ = _call(state, "streaming_llm", 5, sinks=2)
    assert positions[0, 0].tolist() == [0, 1, 7, 8, 9]
    assert (labels == TEXT).all()


def test_snapkv_hand_computed_scores_and_kept_slots():
    """One window query [1, 0] against keys [a_j, 0] with scale 1: the scores are softmax(a)."""
    a = torch.tensor([0.0, 5.0, 0.0, 4.0, 0.0, 0.0])
    keys = torch.zeros(1, 1, 6, 2)
    keys[0, 0, :, 0] = a
    query = torch.zeros(1, 1, 6, 2)
    query[0, 0, -1] = torch.tensor([1.0, 0.0])
    state = _hand_state(query, keys)
    k, v, labels, positions, scores, weights = _call(state, "snapkv", 3, scaling=1.0, window=1, pool="none")
    assert positions[0, 0].tolist() == [1, 3, 5]  # the window slot (5) is forced, then the two best scores
    expected = torch.softmax(a, 0)[[1, 3, 5]]
    torch.testing.assert_close(scores[0, 0], expected)
    torch.testing.assert_close(k[0, 0, :, 0], a[[1, 3, 5]])


def test_gqa_scores_are_reduced_over_the_group_before_selection():
    """Two query heads share one KV head: one favours slot 1, the other slot 2 more weakly. The group
    mean keeps slot 1; the group max keeps whichever single head is more peaked."""
    keys = torch.zeros(1, 1, 4, 2)
    keys[0, 0, 1] = torch.tensor([6.0, 0.0])
    keys[0, 0, 2] = torch.tensor([0.0, 9.0])
    query = torch.zeros(1, 2, 4, 2)
    query[0, 0, -1] = torch.tensor([1.0, 0.0])
    query[0, 1, -1] = torch.tensor([0.0, 0.5])
    state = _hand_state(query, keys)
    _, _, _, kept_mean, _, _ = _call(state, "snapkv", 2, scaling=1.0, window=1, pool="none", group_reduce="mean")
    _, _, _, kept_max, _, _ = _call(state, "snapkv", 2, scaling=1.0, window=1, pool="none", group_reduce="max")
    p0 = torch.softmax(torch.tensor([0.0, 6.0, 0.0, 0.0]), 0)
    p1 = torch.softmax(torch.tensor([0.0, 0.0, 4.5, 0.0]), 0)
    best_mean = int(torch.argmax((p0 + p1)[:3]))
    best_max = int(torch.argmax(torch.maximum(p0, p1)[:3]))
    assert kept_mean[0, 0].tolist() == sorted([best_mean, 3])
    assert kept_max[0, 0].tolist() == sorted([best_max, 3])


@pytest.mark.parametrize(
    "budget,valid,expected", [(0.25, 10, 3), (0.5, 10, 5), (0.3, 7, 3), (1.0, 7, 7), (4, 10, 4), (20, 10, 10)]
)
def test_budget_arithmetic(budget, valid, expected):
    state = _state(seq=10)
    state[3][:, :, : 10 - valid] = INVALID
    _, _, labels, positions, _, _ = _call(state, "snapkv", budget, window=1)
    kept = (labels[0] != INVALID).sum(-1)
    assert kept.tolist() == [expected, expected]
    if isinstance(budget, float):
        assert labels.shape[-1] == math.ceil(budget * 10)


def test_text_prior_keeps_text_on_top_of_the_image_budget():
    state = _state(seq=12)
    state[3][..., 2:10] = IMAGE  # 8 image slots, 4 text slots
    _, _, labels, positions, _, _ = _call(state, "text_prior", 0.25, window=2)
    for head in range(2):
        row = labels[0, head]
        assert int((row == TEXT).sum()) == 4 and int((row == IMAGE).sum()) == 2


@pytest.mark.parametrize("method,params", [("snapkv", {"window": 3}), ("h2o", {}), ("streaming_llm", {"sinks": 2})])
def test_left_padding_keeps_what_the_row_keeps_alone(method, params):
    pad, seq = 3, 11
    alone = _state(batch=1, seq=seq - pad)
    padded = [
        torch.cat(
            [torch.zeros_like(t[..., :pad, :] if t.dim() == 4 else t[..., :pad]), t], dim=-2 if t.dim() == 4 else -1
        )
        for t in alone
    ]
    padded[3][..., :pad] = INVALID
    padded[4] = torch.arange(seq).expand(1, 2, seq).contiguous()
    out_alone = _call(alone, method, 0.5, **params)
    out_padded = _call(padded, method, 0.5, **params)
    valid = out_padded[2] != INVALID
    assert torch.equal(out_padded[3][valid].view(1, 2, -1) - pad, out_alone[3])
    torch.testing.assert_close(out_padded[0][valid].view(out_alone[0].shape), out_alone[0])


def test_outputs_never_alias_inputs():
    state = _state(seq=6)
    outputs = _call(state, "snapkv", 1.0, window=2)
    for out, original in zip(outputs, state[1:], strict=True):
        assert out.data_ptr() != original.data_ptr()
    for out, original in zip(outputs[:4], state[1:5], strict=True):  # budget 1.0 keeps keys..positions as they are
        assert torch.equal(out, original)


@pytest.mark.parametrize("group_reduce", ["mean", "max"])
def test_all_query_scores_do_not_depend_on_query_chunking(monkeypatch, group_reduce):
    from mmkv_compile.kernels import reference

    state = _state(seq=9, groups=2)
    policy = build_method("snapkv", window=9, pool="none", group_reduce=group_reduce).policy(4).to_string()
    whole = torch.ops.mmkv.score_evict_merge(*state, 0.3, policy, True)
    monkeypatch.setattr(reference, "QUERY_CHUNK", 2)
    chunked = torch.ops.mmkv.score_evict_merge(*state, 0.3, policy, True)
    assert torch.equal(whole[3], chunked[3])
    torch.testing.assert_close(whole[4], chunked[4])
