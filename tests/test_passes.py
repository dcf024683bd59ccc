"""The passes on small hand-written attention idioms (vLLM-style: ops counted before and after a pass),
and explain() on a real model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build

import mmkv_compile
from mmkv_compile.backend import rewrite_graph
from mmkv_compile.cache import STATE_FIELDS
from mmkv_compile.config import CompressionConfig

SCORE_EVICT_MERGE = torch.ops.mmkv.score_evict_merge.default
B, HQ, HKV, S, D = 1, 4, 2, 12, 8


class LayerState:
    """Stands in for a cache layer: Dynamo lifts its tensors as graph inputs and its writes as outputs."""

    def __init__(self, past: int = 0):
        self.keys = torch.randn(B, HKV, past, D)
        self.values = torch.randn(B, HKV, past, D)
        self.labels = torch.zeros(B, HKV, past, dtype=torch.int8)
        self.positions = torch.arange(past).expand(B, HKV, past).contiguous()
        self.scores = torch.zeros(B, HKV, past)
        self.weights = torch.ones(B, HKV, past)


def _append(layer: LayerState, k, v):
    num_new = k.shape[2]
    labels = torch.zeros(B, HKV, num_new, dtype=torch.int8)
    positions = (torch.arange(num_new) + layer.positions.shape[-1]).expand(B, HKV, num_new).contiguous()
    state = torch.ops.mmkv.cache_append(
        layer.keys, layer.values, layer.labels, layer.positions, layer.scores, layer.weights, k, v, labels, positions
    )
    layer.keys, layer.values, layer.labels, layer.positions, layer.scores, layer.weights = state
    return state[0], state[1]


def eager_mul_scale_repeat_kv(q, k, v, layer):
    k, v = _append(layer, k, v)
    k = k[:, :, None].expand(B, HKV, HQ // HKV, k.shape[2], D).reshape(B, HQ, k.shape[2], D)
    v = v[:, :, None].expand(B, HKV, HQ // HKV, v.shape[2], D).reshape(B, HQ, v.shape[2], D)
    weights = torch.matmul(q, k.transpose(2, 3)) * (D**-0.5)
    mask = torch.zeros(q.shape[2], k.shape[2])
    weights = weights + mask
    probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(probs, p=0.0, training=False), v)


def eager_div_scale_repeat_interleave(q, k, v, layer):
    k, v = _append(layer, k, v)
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    weights = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(D)
    return torch.matmul(weights.softmax(dim=-1).to(q.dtype), v)


def sdpa_enable_gqa(q, k, v, layer):
    k, v = _append(layer, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)


def no_cache_attention(q, k, v, layer):  # a vision encoder: K/V are not cached
    return F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))


IDIOMS = [eager_mul_scale_repeat_kv, eager_div_scale_repeat_interleave, sdpa_enable_gqa]


class CaptureBackend:
    """Runs the mmkv passes and keeps the graph before and after, to count ops."""

    def __init__(self, **options):
        self.config = CompressionConfig.from_options(options)
        self.before = self.after = self.report = None

    def __call__(self, gm, example_inputs):
        self.before = _count(gm, SCORE_EVICT_MERGE)
        new_gm, self.report = rewrite_graph(gm, self.config)
        self.after = _count(new_gm, SCORE_EVICT_MERGE)
        self.graph = new_gm.graph
        return new_gm.forward


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _inputs(num_new):
    return torch.randn(B, HQ, num_new, D), torch.randn(B, HKV, num_new, D), torch.randn(B, HKV, num_new, D)


@pytest.mark.parametrize("idiom", IDIOMS, ids=lambda f: f.__name__)
def test_prefill_site_found_and_operator_inserted(idiom):
    torch._dynamo.reset()
    backend = CaptureBackend(method="snapkv", budget=0.5, window=2, inductor=False)
    q, k, v = _inputs(S)
    expected = idiom(q, k, v, LayerState())
    layer = LayerState()
    out = torch.compile(idiom, backend=backend, fullgraph=True)(q, k, v, layer)
    assert (backend.before, backend.after) == (0, 1)
    (site,) = backend.report.sites
    assert site.cache == "mmkv" and site.evicts and site.gqa_groups == HQ // HKV
    torch.testing.assert_close(out, expected)  # this step still attends to every token
    assert layer.keys.shape[2] == S // 2  # what is stored is compressed
    op = next(n for n in backend.graph.nodes if n.target is SCORE_EVICT_MERGE)
    assert op.args[1 + len(STATE_FIELDS)] == pytest.approx(D**-0.5)  # the scale, read from the graph


@pytest.mark.parametrize("idiom", IDIOMS, ids=lambda f: f.__name__)
def test_decode_site_gets_a_slot_mask(idiom):
    """Past the prompt, the site's mask comes from the slots: padding slots are invisible."""
    torch._dynamo.reset()
    backend = CaptureBackend(method="snapkv", budget=0.5, window=2, inductor=False)

    def padded_layer():
        layer = LayerState(past=S)
        layer.labels[..., :3] = -1
        return layer

    torch.manual_seed(0)
    layer = padded_layer()
    q, k, v = _inputs(1)
    out = torch.compile(idiom, backend=backend, fullgraph=True)(q, k, v, layer)
    assert backend.after == 0  # snapkv compresses the prompt only
    (site,) = backend.report.sites
    assert site.mask_rebuilt
    visible = (layer.labels != -1).repeat_interleave(HQ // HKV, 1).unsqueeze(2)
    expected = F.scaled_dot_product_attention(q, layer.keys, layer.values, attn_mask=visible, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_attention_without_a_cache_is_left_alone():
    torch._dynamo.reset()
    backend = CaptureBackend(method="snapkv", budget=0.5, inductor=False)
    q, k, v = _inputs(S)
    torch.compile(no_cache_attention, backend=backend, fullgraph=True)(q, k, v, None)
    (site,) = backend.report.sites
    assert site.cache == "none" and not site.rewritten and "no KV cache" in site.reason
    assert backend.after == 0


def test_explain_reports_every_graph_and_site():
    tiny = build("llava")
    report = mmkv_compile.explain(tiny.model, "h2o", 0.5, **tiny.inputs)
    phases = {g.phase for g in report.graphs}
    assert {"prefill", "decode"} <= phases
    lm_sites = [s for phase, s in report.sites() if phase == "prefill" and s.cache == "mmkv"]
    assert [s.layer for s in lm_sites] == [0, 1] and all(s.evicts and s.gqa_groups == 2 for s in lm_sites)
    vision = [s for _, s in report.sites() if s.cache == "none"]
    assert vision and not any(s.rewritten for s in vision)
    decode = [s for phase, s in report.sites() if phase == "decode" and s.cache == "mmkv"]
    assert decode and all(s.evicts and s.mask_rebuilt for s in decode)
    text = str(report)
    assert "layer   0" in text and "vision" in text and "evict+mask" in text
    assert report.to_dict()["graphs"][0]["sites"] is not None
    assert "forward" not in tiny.model.__dict__  # explain leaves the model alone
