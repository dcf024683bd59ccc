"""The passes on small hand-written attention idioms (vLLM-style: ops counted before and after the passes, the
rewritten output compared with plain attention), and the cases they must leave alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support import SCORE_EVICT_MERGE, CaptureBackend

from mmkv_compile.cache import MMKVLayer
from mmkv_compile.masks import slot_attention_mask
from mmkv_compile.passes.graph_utils import SDPA_TARGETS, is_call
from mmkv_compile.state import STATE_FIELDS

B, HQ, HKV, S, D = 1, 4, 2, 12, 8


def layer_with_past(past: int = 0, window: int = 0, pad: int = 0) -> MMKVLayer:
    """A real cache layer holding ``past`` slots (the first ``pad`` of them padding)."""
    layer = MMKVLayer(rank=0, count=1, window=window)
    if past:
        layer.update(torch.randn(B, HKV, past, D), torch.randn(B, HKV, past, D))
        layer.labels[..., :pad] = -1
    return layer


def eager_mul_scale_repeat_kv(q, k, v, layer):
    k, v = layer.update(k, v)
    k = k[:, :, None].expand(B, HKV, HQ // HKV, k.shape[2], D).reshape(B, HQ, k.shape[2], D)
    v = v[:, :, None].expand(B, HKV, HQ // HKV, v.shape[2], D).reshape(B, HQ, v.shape[2], D)
    weights = torch.matmul(q, k.transpose(2, 3)) * (D**-0.5)
    mask = torch.zeros(q.shape[2], k.shape[2])
    weights = weights + mask
    probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(probs, p=0.0, training=False), v)


def eager_div_scale_repeat_interleave(q, k, v, layer):
    k, v = layer.update(k, v)
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    weights = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(D)
    return torch.matmul(weights.softmax(dim=-1).to(q.dtype), v)


def sdpa_enable_gqa(q, k, v, layer):
    k, v = layer.update(k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)


def no_cache_attention(q, k, v, layer):  # a vision encoder: K/V are not cached
    return F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))


def values_from_another_layer(q, k, v, layer):  # keys and values of different cache updates
    keys, _ = layer.update(k, v)
    other = MMKVLayer(rank=0, count=1)
    _, values = other.update(k, v)
    return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def scale_from_a_tensor(q, k, v, layer):  # eager attention whose scale is not a constant
    k, v = layer.update(k, v)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scale = q.new_tensor(D**-0.5) * q.abs().mean() / q.abs().mean()
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1), v)


IDIOMS = [eager_mul_scale_repeat_kv, eager_div_scale_repeat_interleave, sdpa_enable_gqa]


def _inputs(num_new):
    return torch.randn(B, HQ, num_new, D), torch.randn(B, HKV, num_new, D), torch.randn(B, HKV, num_new, D)


def _compiled(fn, backend):
    return torch.compile(fn, backend=backend, fullgraph=True)


@pytest.mark.parametrize("idiom", IDIOMS, ids=lambda f: f.__name__)
def test_prefill_site_found_and_operator_inserted(idiom):
    backend = CaptureBackend(method="snapkv", budget=0.5, window=2)
    q, k, v = _inputs(S)
    expected = idiom(q, k, v, layer_with_past())
    layer = layer_with_past()
    out = _compiled(idiom, backend)(q, k, v, layer)
    assert backend.op_counts(SCORE_EVICT_MERGE) == (0, 1)
    (site,) = backend.report.sites
    assert site.cache == "mmkv" and site.evicts and site.gqa_groups == HQ // HKV
    torch.testing.assert_close(out, expected)  # this step still attends to every token
    assert layer.keys.shape[2] == S // 2  # what is stored is compressed
    (op,) = backend.nodes(SCORE_EVICT_MERGE)
    assert op.args[1 + len(STATE_FIELDS)] == pytest.approx(D**-0.5)  # the scale, read from the graph


@pytest.mark.parametrize("idiom", IDIOMS, ids=lambda f: f.__name__)
def test_decode_site_gets_a_slot_mask(idiom):
    """Past the prompt, the site's mask comes from the slots: padding slots are invisible."""
    backend = CaptureBackend(method="snapkv", budget=0.5, window=2)
    torch.manual_seed(0)
    layer = layer_with_past(S, pad=3)
    q, k, v = _inputs(1)
    out = _compiled(idiom, backend)(q, k, v, layer)
    assert backend.op_counts(SCORE_EVICT_MERGE) == (0, 0)  # snapkv compresses the prompt only
    (site,) = backend.report.sites
    assert site.mask_rebuilt and site.decision == "append"
    visible = (layer.labels != -1).repeat_interleave(HQ // HKV, 1).unsqueeze(2)
    expected = F.scaled_dot_product_attention(q, layer.keys, layer.values, attn_mask=visible, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_sliding_layers_decode_mask_hides_what_left_its_window():
    """A window of 6: the new query (position 12) sees positions 7..12, whatever the layer still holds."""
    backend = CaptureBackend(method="h2o", budget=0.5)
    layer = layer_with_past(S, window=6)
    q, k, v = _inputs(1)
    keys = torch.cat([layer.keys, k], dim=2)[:, :, -6:]
    values = torch.cat([layer.values, v], dim=2)[:, :, -6:]
    out = _compiled(sdpa_enable_gqa, backend)(q, k, v, layer)
    expected = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    mask = slot_attention_mask(layer.labels, layer.positions, torch.zeros(B, HQ, 1, D), window=6)
    assert bool((layer.positions[mask[:, ::2, 0]] > layer.positions.max() - 6).all())


@pytest.mark.parametrize(
    "fn,cache,reason",
    [
        (no_cache_attention, "none", "no KV cache"),
        (values_from_another_layer, "unknown", "different cache updates"),
    ],
    ids=["no-cache", "mixed-updates"],
)
def test_attention_the_passes_do_not_understand_is_left_alone(fn, cache, reason):
    backend = CaptureBackend(method="snapkv", budget=0.5, window=2)
    q, k, v = _inputs(S)
    expected = fn(q, k, v, layer_with_past())
    out = _compiled(fn, backend)(q, k, v, layer_with_past())
    assert backend.op_counts(SCORE_EVICT_MERGE) == (0, 0)
    site = backend.report.sites[0]
    assert site.cache == cache and not site.rewritten and reason in site.reason
    torch.testing.assert_close(out, expected)


def test_attention_in_a_form_the_passes_do_not_recognise_warns_and_compiles_unchanged():
    """The scale is a tensor: no site is recognised, and the report says which cache layer no attention read."""
    backend = CaptureBackend(method="snapkv", budget=0.5, window=2)
    q, k, v = _inputs(S)
    expected = scale_from_a_tensor(q, k, v, layer_with_past())
    out = _compiled(scale_from_a_tensor, backend)(q, k, v, layer_with_past())
    assert backend.op_counts(SCORE_EVICT_MERGE) == (0, 0)
    assert any("no attention reading them was understood" in w and "matmul" in w for w in backend.report.warnings)
    torch.testing.assert_close(out, expected)


def test_a_method_that_keeps_everything_inserts_nothing():
    backend = CaptureBackend(method="full")
    q, k, v = _inputs(S)
    layer = layer_with_past()
    _compiled(sdpa_enable_gqa, backend)(q, k, v, layer)
    assert backend.op_counts(SCORE_EVICT_MERGE) == (0, 0)
    assert backend.report.sites[0].decision == "keep" and layer.keys.shape[2] == S


# -- causal prefill attention ------------------------------------------------------------------------------


def masked_prefill(q, k, v, mask):  # what transformers traces: an explicit mask, is_causal=False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _causal(length: int, batch: int = 2) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, length, length)


CAUSAL_CASES = {
    "causal": lambda n: _causal(n),
    "left_padding": lambda n: _causal(n) & (torch.arange(n) >= torch.tensor([[0], [3]])).view(2, 1, 1, n),
    "sliding_window": lambda n: _causal(n) & (torch.arange(n)[:, None] - torch.arange(n)[None] < 4),
    "bidirectional": lambda n: torch.ones(2, 1, n, n, dtype=torch.bool),
    "additive_causal": lambda n: torch.zeros(n, n).masked_fill(~_causal(n, 1)[0, 0], torch.finfo(torch.float32).min),
}


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=str)
def test_is_causal_mask_holds_for_the_causal_mask_only(case):
    from mmkv_compile.kernels.attention import is_causal_mask

    assert bool(is_causal_mask(CAUSAL_CASES[case](9))) == case.endswith("causal")


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=str)
def test_square_prefill_attention_takes_the_causal_path_and_stays_exact(case):
    """One check per mask, every SDPA call replaced; the output equals plain masked SDPA for any mask."""
    from mmkv_compile import ops

    def two_layers(q, k, v, mask):
        return masked_prefill(masked_prefill(q, k, v, mask), k, v, mask)

    backend = CaptureBackend(method="full")
    q, k, v = torch.randn(2, HQ, S, D), torch.randn(2, HKV, S, D), torch.randn(2, HKV, S, D)
    mask = CAUSAL_CASES[case](S)
    out = torch.compile(two_layers, backend=backend, fullgraph=True, dynamic=True)(q, k, v, mask)
    assert backend.op_counts(ops.CAUSAL_OR_MASKED_ATTENTION) == (0, 2)
    assert backend.op_counts(ops.IS_CAUSAL_MASK) == (0, 1)
    torch.testing.assert_close(out, two_layers(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_attention_over_a_longer_cache_keeps_its_mask():
    """A query shorter than the keys (decode, a chunk after cached tokens) is not the square causal case."""
    from mmkv_compile import ops

    backend = CaptureBackend(method="full")
    q, k, v = torch.randn(1, HQ, 3, D), torch.randn(1, HKV, S, D), torch.randn(1, HKV, S, D)
    mask = torch.ones(1, 1, 3, S, dtype=torch.bool).tril(S - 3)
    out = torch.compile(masked_prefill, backend=backend, fullgraph=True)(q, k, v, mask)
    assert backend.op_counts(ops.CAUSAL_OR_MASKED_ATTENTION) == (0, 0)
    torch.testing.assert_close(out, masked_prefill(q, k, v, mask))


def test_causal_prefill_attention_under_inductor_matches_plain_sdpa():
    """Inductor checks the op's output layout against its fake: both paths must return the one it declares."""

    def attention_then_transpose(q, k, v, mask):  # what the model does with the output
        return masked_prefill(q, k, v, mask).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    compiled = torch.compile(attention_then_transpose, backend="mmkv", options={"method": "full"}, fullgraph=True)
    q, k, v = torch.randn(2, HQ, S, D), torch.randn(2, HKV, S, D), torch.randn(2, HKV, S, D)
    for case in ("causal", "left_padding"):
        mask = CAUSAL_CASES[case](S)
        torch.testing.assert_close(compiled(q, k, v, mask), attention_then_transpose(q, k, v, mask))


def repeat_kv(x: torch.Tensor, repeats: int) -> torch.Tensor:  # transformers' own
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, repeats, s, d).reshape(b, h * repeats, s, d)


def tile_kv(x: torch.Tensor, repeats: int) -> torch.Tensor:  # another head order: query head i reads i % h
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, repeats, s, d).transpose(1, 2).reshape(b, h * repeats, s, d)


def masked_attention_over(repeat):
    def attention(q, k, v, mask):
        r = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, repeat(k, r), repeat(v, r), attn_mask=mask)

    return attention


def _slots_mask(rows: int, length: int) -> torch.Tensor:
    return torch.arange(length) < length - 2  # the last two slots empty, as in capacity buffers


@pytest.mark.parametrize("rows, rewritten", [(1, True), (S, False)], ids=["decode", "prefill"])
def test_decode_attention_reads_grouped_heads_in_place(rows, rewritten):
    """A one-row query over repeat_kv's copy reads the cache itself with enable_gqa; a prefill keeps its copy.
    Either way the output equals the eager one."""
    attention = masked_attention_over(repeat_kv)
    backend = CaptureBackend(method="full")
    q, k, v = torch.randn(B, HQ, rows, D), torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D)
    mask = _slots_mask(rows, S).expand(B, 1, rows, S)
    out = torch.compile(attention, backend=backend, fullgraph=True, dynamic=True)(q, k, v, mask)
    torch.testing.assert_close(out, attention(q, k, v, mask))
    (sdpa,) = [n for n in backend.graph.nodes if is_call(n, SDPA_TARGETS)]
    expands = sum(1 for n in backend.graph.nodes if n.op == "call_method" and n.target == "expand")
    assert backend.report.passes["grouped_query_attention"] == int(rewritten)
    assert (sdpa.kwargs.get("enable_gqa", False), expands) == ((True, 0) if rewritten else (False, 2))


def test_decode_attention_keeps_a_copy_in_another_head_order():
    """Tiled heads (query head i reads key head i % h) are not what enable_gqa computes: left alone, exact."""
    attention = masked_attention_over(tile_kv)
    backend = CaptureBackend(method="full")
    q, k, v = torch.randn(B, HQ, 1, D), torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D)
    mask = _slots_mask(1, S).expand(B, 1, 1, S)
    out = torch.compile(attention, backend=backend, fullgraph=True)(q, k, v, mask)
    assert backend.report.passes["grouped_query_attention"] == 0
    torch.testing.assert_close(out, attention(q, k, v, mask))


def test_decode_attention_in_place_under_inductor_matches_eager():
    attention = masked_attention_over(repeat_kv)
    compiled = torch.compile(attention, backend="mmkv", options={"method": "full"}, fullgraph=True)
    q, k, v = torch.randn(B, HQ, 1, D), torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D)
    mask = _slots_mask(1, S).expand(B, 1, 1, S)
    torch.testing.assert_close(compiled(q, k, v, mask), attention(q, k, v, mask))
