"""Compiling a rewritten graph region by region (``mmkv_compile.regions``): the same tokens and kept slots as the
graph run without Inductor, each repeated layer compiled once, and a compiled function reused only where that is
sound (checked on hand-built graphs over a shape environment of their own)."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torch.fx as fx
from support import build, generate
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import mmkv_compile
from mmkv_compile import MMKVWarning
from mmkv_compile.api import compiled_reports
from mmkv_compile.backend import MMKVBackend
from mmkv_compile.config import CompressionConfig
from mmkv_compile.regions import CompiledRegion, assign_regions, compile_regions, dense_order
from mmkv_compile.reports import DECODE, PREFILL

LAYERS = 4


@pytest.mark.parametrize(
    "family,method",
    [("llama", "snapkv"), ("llama", "h2o"), ("llama", "meda"), ("phi3", "snapkv"), ("llava", "madakv")],
)
def test_regions_compile_what_the_graph_computes(family, method):
    """Inductor by regions gives the tokens, logits and kept positions of the rewritten graph run as it is (phi3's
    fused projection is where Inductor returned a ``cat`` in another layout than the graph's), and the decode
    graph's layers share compiled functions."""
    tiny = build(family, layers=LAYERS)
    reference = mmkv_compile.compile(build(family, layers=LAYERS).model, method, 0.5, inductor=False)
    expected_tokens, expected_logits, expected_cache = generate(reference, tiny.inputs, 5)
    model = mmkv_compile.compile(tiny.model, method, 0.5)
    tokens, logits, cache = generate(model, tiny.inputs, 5)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    for layer, expected in zip(cache.mmkv_layers, expected_cache.mmkv_layers, strict=True):
        assert torch.equal(layer.positions, expected.positions)
    reports = {report.phase: report for report in compiled_reports(model) if report.regions is not None}
    whole = [(r.phase, r.whole_because) for r in compiled_reports(model) if r.whole_because]
    assert {PREFILL, DECODE} <= set(reports), whole  # (a vision tower's graph may be split too: transformers 5.2)
    assert reports[DECODE].regions.reused >= LAYERS - 2  # layers 1.. share a function (layer 0 may differ)
    operators = sum(1 for s in reports[PREFILL].sites if s.rewritten)  # at least one operator per rewritten layer
    assert reports[PREFILL].regions.operators >= operators


def test_a_prompt_graph_for_any_length_compiles_by_regions():
    """A second prompt length makes Dynamo compile the prompt graph for any length. MadaKV's per-layer budgets
    then give kept lengths bounded by a symbolic length: Inductor still compiles the graph by regions, with no
    warning, and decoding stays in place, with the reference's tokens and kept slots."""
    model = mmkv_compile.compile(build("llava", layers=LAYERS).model, "madakv", 0.5)
    generate(model, build("llava", layers=LAYERS).inputs, 2)
    longer = build("llava", layers=LAYERS, text_after=16).inputs
    reference = mmkv_compile.apply_eagerly(build("llava", layers=LAYERS).model, "madakv", 0.5)
    expected_tokens, _, expected_cache = generate(reference, longer, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, _, cache = generate(model, longer, 3)
    assert not [str(w.message) for w in caught if issubclass(w.category, MMKVWarning)]
    assert torch.equal(tokens, expected_tokens)
    for layer, expected in zip(cache.mmkv_layers, expected_cache.mmkv_layers, strict=True):
        assert torch.equal(layer.positions, expected.positions)
        assert layer.buffers is not None
    # (in a process that compiled LLaVA before, the first prompt graph may already be the one for any length)
    prompts = [report for report in compiled_reports(model) if report.phase == PREFILL]
    assert prompts and all(report.regions is not None and not report.warnings for report in prompts)


def test_each_mmkv_operator_is_a_region_of_its_own():
    """Layers split at mmkv's operators (their constant arguments differ by layer), and a tuple's items stay
    with the operator that returns it."""
    from support import CaptureBackend, compile_with

    tiny = build("llama", layers=LAYERS)
    backend = CaptureBackend(method="snapkv", budget=0.5)
    tiny.model.forward = compile_with(tiny.model, backend)
    generate(tiny.model, tiny.inputs, 1)
    prefill = backend.keep_decoder_graph().graphs[0][1]
    assignment, operators = assign_regions(prefill)
    mmkv_nodes = [n for n in assignment if str(n.target).startswith("mmkv.")]
    assert {assignment[n] for n in mmkv_nodes} == operators and len(operators) == len(mmkv_nodes)
    for node, region in assignment.items():
        if node.target is operator.getitem and node.args[0] in assignment:
            assert region == assignment[node.args[0]]


class _MaskedAttentionLayer(torch.nn.Module):
    """A prompt layer as transformers 5.2 traces it: SDPA over an explicit causal mask, then the transpose back."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = q.contiguous(), k.contiguous()  # as after rotary embeddings: SDPA's fake output is then contiguous
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.out(y.transpose(1, 2).reshape(b, n, -1))


class _MaskedAttentionStack(torch.nn.Module):
    def __init__(self, layers: int = LAYERS):
        super().__init__()
        self.layers = torch.nn.ModuleList(_MaskedAttentionLayer() for _ in range(layers))

    def forward(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return x


def test_a_region_reads_the_causal_attention_operator_in_the_layout_it_returns():
    """The causal-or-masked operator returns ``[B, H, L, D]`` laid out as ``[B, L, H, D]``; the next region must be
    compiled for that layout, not for the one SDPA's fake had (which failed at run time on transformers 5.2)."""
    torch.manual_seed(0)
    stack = _MaskedAttentionStack().eval()
    x, mask = torch.randn(1, 12, 32), torch.ones(12, 12, dtype=torch.bool).tril().expand(1, 1, 12, 12)
    backend = MMKVBackend(CompressionConfig.from_options({"method": "full"}))
    compiled = torch.compile(stack, backend=backend, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, mask), stack(x, mask), atol=1e-5, rtol=1e-5)
    (report,) = backend.reports
    assert report.passes["causal_prefill_attention"] == LAYERS and report.regions.reused >= LAYERS - 2


# -- reuse, on hand-built graphs ---------------------------------------------------------------------------


def _symbolic(mode: FakeTensorMode, rows: int, name: str) -> torch.Tensor:
    """A fake ``[rows, 8]`` tensor whose first size is a symbol of its own (hint ``rows``)."""
    context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    return mode.from_tensor(torch.zeros(rows, 8), symbolic_context=context, source=ConstantSource(name))


def _two_layers(mode: FakeTensorMode, rows: tuple[int, int]) -> fx.GraphModule:
    """``model.layers.0`` and ``model.layers.1``, each ``x * 2`` on an input with a symbolic size of its own."""
    graph = fx.Graph()
    outputs = []
    for index, count in enumerate(rows):
        value = _symbolic(mode, count, f"x{index}")
        size = graph.placeholder(f"s{index}")  # Dynamo passes each symbolic size as an input of its own
        size.meta["example_value"] = value.shape[0]
        x = graph.placeholder(f"x{index}")
        x.meta["example_value"] = value
        y = graph.call_function(torch.mul, (x, 2))
        y.meta["example_value"] = x.meta["example_value"] * 2
        y.meta["nn_module_stack"] = {"layer": (f"model.layers.{index}", torch.nn.Module)}
        outputs.append(y)
    graph.output(tuple(outputs))
    return fx.GraphModule(torch.nn.Module(), graph)


class RecordingCompiler:
    """Runs a region as it is, counting compiles; ``assume`` is a guard the compile adds (as Inductor may)."""

    def __init__(self, assume=None):
        self.compiled, self.assume = 0, assume

    def __call__(self, region: fx.GraphModule, inputs):
        self.compiled += 1
        if self.assume is not None:
            self.assume(next(x for x in inputs if isinstance(x, torch.SymInt)))
        return region.forward


def _compile(rows=(4, 6), before=None, assume=None):
    mode = FakeTensorMode(shape_env=ShapeEnv())
    gm = _two_layers(mode, rows)
    if before is not None:
        before(gm.graph.find_nodes(op="placeholder")[0].meta["example_value"])
    compiler = RecordingCompiler(assume)
    split, stats = compile_regions(gm, compiler)
    return gm, split, stats, compiler


def test_identical_layers_are_compiled_once():
    _, split, stats, compiler = _compile()
    assert compiler.compiled == 1 and stats.compiled == 1 and stats.reused == 1 and stats.regions == 2
    a, b = torch.randn(3, 8), torch.randn(5, 8)
    out = split(3, a, 5, b)
    torch.testing.assert_close(out[0], a * 2)
    torch.testing.assert_close(out[1], b * 2)


def test_a_layer_with_other_guards_is_compiled_on_its_own():
    """Dynamo guarded the first layer's size (x0 >= 3) and not the second's: sharing code compiled under that
    fact would be unsound."""
    _, _, stats, compiler = _compile(before=lambda size: bool(size >= 3))
    assert compiler.compiled == 2 and stats.reused == 0


def test_what_compiling_assumed_is_guarded_for_the_layer_that_reuses_it():
    gm, _, stats, _ = _compile(assume=lambda size: bool(size <= 100))
    assert stats.reused == 1
    first, second = (p.meta["example_value"] for p in gm.graph.find_nodes(op="placeholder")[::2])
    assumed = {str(guard.expr) for guard in second.node.shape_env.guards}
    assert {f"{first.node.expr} <= 100", f"{second.node.expr} <= 100"} <= assumed


def test_what_compiling_assumed_but_does_not_hold_for_another_layer_is_not_reused():
    """Compiling the first layer (4 rows) assumed fewer than 5 rows; the second has 6: it gets its own compile."""
    _, _, stats, compiler = _compile(rows=(4, 6), assume=lambda size: bool(size < 5))
    assert compiler.compiled == 2 and stats.reused == 0


def test_a_graph_without_repeated_layers_is_left_to_whole_compilation():
    gm = fx.symbolic_trace(lambda x: x * 2)
    assert compile_regions(gm, RecordingCompiler()) is None


def test_outputs_leave_in_the_layout_of_the_captured_value():
    """A compiled function returning a dense output in another layout than the graph's (Inductor's ``cat`` on
    CPU) is laid out as the graph's before the next region, which checks strides, reads it."""
    expected = torch.arange(24.0).reshape(2, 3, 4)
    transposed = expected.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other layout
    assert dense_order(expected) == (0, 1, 2) and dense_order(transposed) == (0, 2, 1)
    assert dense_order(expected[:, :, :2]) is None  # a view into a larger tensor: left as it is
    (out,) = CompiledRegion(lambda: (transposed,), [dense_order(expected)])()
    assert out.stride() == expected.stride() and torch.equal(out, expected)
