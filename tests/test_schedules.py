"""Layer schedules: the budgets they give each layer (hand-computed and summed), and the graph each one builds
(its signal, allocation and operator nodes counted and ordered), with the eager reference running the same
schedule classes."""

from __future__ import annotations

import math

import pytest
import torch
from support import INVALID, CaptureBackend, build, compile_with, policy_of, run_op, slot_state

import mmkv_compile
from mmkv_compile import ops
from mmkv_compile.compat import output_cache
from mmkv_compile.kernels.compensation import compensate_layer_budgets
from mmkv_compile.kernels.layer_signals import allocate_layer_budgets, layer_fractions, layer_signal
from mmkv_compile.policy import LayerPlacement
from mmkv_compile.state import SlotState


@pytest.mark.parametrize("num_layers", [2, 5, 30])
@pytest.mark.parametrize("budget,prompt", [(0.5, 100), (0.2, 333), (0.1, 2048), (64, 500)])
def test_pyramid_layer_budgets_fall_and_sum_to_at_most_the_total(num_layers, budget, prompt):
    policy = policy_of("pyramidkv", budget, window=8)
    uniform = math.floor(prompt * budget) if isinstance(budget, float) else budget
    counts = []
    for layer in range(num_layers):
        placed = policy.at_layer(LayerPlacement(index=layer, count=num_layers))
        keys = torch.randn(1, 1, prompt, 4)
        out = run_op(placed, torch.randn(1, 1, prompt, 4), slot_state(keys))
        counts.append(int((out.labels != INVALID).sum()))
    assert counts == sorted(counts, reverse=True)  # the pyramid falls layer by layer
    assert counts[0] > counts[-1] >= 8  # the window is always kept
    assert num_layers * uniform - num_layers < sum(counts) <= num_layers * uniform  # rounding down only


def test_layer_entropy_signals_hand_computed():
    """Equal keys give uniform attention: each query row's entropy is log(number of keys it sees)."""
    seq = 6
    keys = torch.ones(1, 1, seq, 2)
    query = torch.ones(1, 1, seq, 2)
    labels = torch.tensor([[[0, 1, 1, 1, 0, 0]]], dtype=torch.int8)  # text, 3 image, 2 text
    positions = torch.arange(seq).view(1, 1, seq)
    full = layer_signal(query, keys, labels, positions, 1.0, "attention")
    expected = sum(math.log(n) for n in range(1, seq + 1)) / seq
    torch.testing.assert_close(full, torch.tensor([[expected, seq]], dtype=torch.float64))
    # Cross-modal: text rows 4, 5 see the 3 image keys (log 3); image rows 1-3 see text key 0 (log 1 = 0).
    cross = layer_signal(query, keys, labels, positions, 1.0, "cross_modal")
    torch.testing.assert_close(cross[:, 0], torch.tensor([math.log(3)], dtype=torch.float64))
    # Under a sliding window of 3, a row sees at most 3 keys and the layer can keep at most 2 live slots.
    windowed = layer_signal(query, keys, labels, positions, 1.0, "attention", 3)
    expected = (math.log(1) + math.log(2) + 4 * math.log(3)) / seq
    torch.testing.assert_close(windowed, torch.tensor([[expected, 2]], dtype=torch.float64))


def test_meda_fractions_follow_entropy_and_keep_the_mean():
    torch.manual_seed(0)
    entropies = torch.randn(30, 3) * 2
    fractions = layer_fractions(entropies, 0.2, 0.01)
    torch.testing.assert_close(fractions.mean(0), torch.full((3,), 0.2))
    assert float(fractions.min()) >= 0.01 - 1e-7 and float(fractions.max()) <= 1.0  # float32 storage
    order = entropies[:, 0].argsort()
    assert torch.all(fractions[order, 0].diff() >= -1e-6)  # more entropy, more budget
    capped = layer_fractions(torch.tensor([[9.0], [0.0], [0.0], [0.0]]), 0.6, 0.01)
    torch.testing.assert_close(
        capped[:, 0], torch.tensor([1.0, 0.6 * 4 / 3 - 1 / 3, 0.6 * 4 / 3 - 1 / 3, 0.6 * 4 / 3 - 1 / 3])
    )


def test_proportional_fractions_keep_the_mean():
    densities = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
    fractions = layer_fractions(densities, 0.25, 0.01, "proportional")[:, 0]
    torch.testing.assert_close(fractions, torch.tensor([0.1, 0.2, 0.3, 0.4]))  # proportional, mean 0.25
    capped = layer_fractions(torch.tensor([[0.7], [0.1], [0.1], [0.1]]), 0.5, 0.01, "proportional")[:, 0]
    torch.testing.assert_close(capped.mean(), torch.tensor(0.5))
    assert float(capped[0]) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_allocated_counts_sum_to_exactly_the_uniform_total(seed):
    """Integer slots per layer from the fractions: largest remainders first, each layer within its live slots,
    and the layers together keep exactly sum_l floor(budget * live_l) (sliding layers have fewer live slots)."""
    generator = torch.Generator().manual_seed(seed)
    layers, batch, budget = 6, 3, 0.3
    live = torch.tensor([[97, 80, 5]] * 3 + [[40, 40, 5]] * 3, dtype=torch.float64)  # [L, B]
    signal = torch.randn(layers, batch, generator=generator, dtype=torch.float64)
    counts = allocate_layer_budgets(torch.stack([signal, live], dim=-1), budget, 0.01)
    target = (live * 3 // 10).sum(0).long()
    assert counts.sum(0).tolist() == target.tolist()
    assert bool((counts <= live.long()).all()) and bool((counts >= 0).all())
    fractions = layer_fractions(signal, budget, 0.01).double()
    wanted = fractions * live
    wanted = wanted * target / wanted.sum(0)
    near = (counts - wanted).abs() < 1 + 1e-9
    assert bool((near | (counts == live.long())).all())  # each within one slot of its share, or full


def test_compensation_carries_overspending_to_later_layers():
    """3 layers, 10 live slots, 1 forced, budget 0.5: 5 per layer, 4 free, 12 free in all. Layer 0 asks for 2
    (even share 4): keeps 2. Layer 1's share is 10/2 = 5; it asks for 9 (cap 2 x 5): keeps 9. The last layer
    gets the 1 left. Kept: 3, 10, 2 = 15 = 3 x 5."""
    demands = torch.tensor([[[[2, 10, 1]]], [[[9, 10, 1]]], [[[7, 10, 1]]]])
    assert compensate_layer_budgets(demands, 0.5, 2.0).flatten().tolist() == [3, 10, 2]


def test_compensation_charges_a_layer_its_neediest_head():
    """Heads are padded to one length: a layer whose heads ask for 1 and 5 free slots costs 5 in every head."""
    demands = torch.tensor([[[[1, 10, 1], [5, 10, 1]]], [[[0, 10, 1], [0, 10, 1]]]])
    assert compensate_layer_budgets(demands, 0.5, 2.0).flatten().tolist() == [6, 4]


@pytest.mark.parametrize("seed", range(5))
def test_compensated_budgets_sum_to_the_uniform_total(seed):
    generator = torch.Generator().manual_seed(seed)
    layers, batch, heads, live, forced, budget = 7, 2, 3, 200, 8, 0.3
    demand = torch.randint(0, live - forced, (layers, batch, heads), generator=generator)
    demands = torch.stack([demand, torch.full_like(demand, live), torch.full_like(demand, forced)], dim=-1)
    counts = compensate_layer_budgets(demands, budget, 2.0)
    assert counts.sum(0).tolist() == [layers * math.floor(live * budget)] * batch
    assert bool((counts >= forced).all()) and bool((counts <= live).all())
    assert len(set(counts[:, 0].tolist())) > 1  # budgets really move between layers


# -- the graphs each schedule builds -------------------------------------------------------------------------


def _prefill_graph(method: str, budget: float, **options) -> CaptureBackend:
    """The rewritten prefill graph of a 4-layer LLaVA's decoder."""
    tiny = build("llava", layers=4)
    backend = CaptureBackend(method=method, budget=budget, **options)
    with torch.no_grad():
        compile_with(tiny.model, backend)(**tiny.inputs, use_cache=True)
    return backend.keep_decoder_graph()


def _order(backend, *targets) -> list:
    positions = {node: i for i, node in enumerate(backend.graph.nodes)}
    return [[positions[n] for n in backend.nodes(t)] for t in targets]


def _anchors(backend) -> list[int]:
    """The decoder's attention calls (SDPA, or the causal prefill pass's replacement of it)."""
    positions = {node: i for i, node in enumerate(backend.graph.nodes)}
    calls = backend.nodes(torch._C._nn.scaled_dot_product_attention) + backend.nodes(ops.CAUSAL_OR_MASKED_ATTENTION)
    return sorted(positions[n] for n in calls)


def test_uniform_schedule_puts_one_operator_before_each_layers_attention():
    backend = _prefill_graph("snapkv", 0.5, window=4)
    assert backend.op_counts(ops.SCORE_EVICT_MERGE) == (0, 4)
    (operators,) = _order(backend, ops.SCORE_EVICT_MERGE)
    anchors = [a for a in _anchors(backend) if a > operators[0] - 50][-4:]
    assert all(op < anchor for op, anchor in zip(operators, anchors, strict=True))
    assert not backend.nodes(ops.LAYER_SIGNAL) and not backend.nodes(ops.ALLOCATE_LAYER_BUDGETS)


@pytest.mark.parametrize("method,signal,allocate", [
    ("meda", ops.LAYER_SIGNAL, ops.ALLOCATE_LAYER_BUDGETS),
    ("vl_cache", ops.LAYER_SIGNAL, ops.ALLOCATE_LAYER_BUDGETS),
    ("madakv", ops.HEAD_DEMAND, ops.COMPENSATE_LAYER_BUDGETS),
])  # fmt: skip
def test_two_phase_schedules_signal_every_layer_then_allocate_then_compress(method, signal, allocate):
    backend = _prefill_graph(method, 0.25)
    signals, allocations, operators = _order(backend, signal, allocate, ops.SCORE_EVICT_MERGE)
    assert (len(signals), len(allocations), len(operators)) == (4, 1, 4)
    assert max(signals) < allocations[0] < min(operators)
    budgets = [n.kwargs["layer_budgets"] for n in backend.nodes(ops.SCORE_EVICT_MERGE)]
    assert [b.args[1] for b in budgets] == [0, 1, 2, 3]  # each layer takes its own row of the allocation
    assert all(b.args[0] is backend.nodes(allocate)[0] for b in budgets)


def test_broadcast_schedule_scores_the_first_layer_and_reuses_its_positions():
    backend = _prefill_graph("hae", 0.5)
    operators = backend.nodes(ops.SCORE_EVICT_MERGE)
    assert len(operators) == 4
    assert "keep_positions" not in operators[0].kwargs
    first_positions = {n.kwargs["keep_positions"] for n in operators[1:]}
    assert len(first_positions) == 1  # one node: the first layer's kept positions, fed to every later layer
    (node,) = first_positions
    positions = node.args[0]  # the positions field of the first operator's output, KV head 0
    assert positions.args == (operators[0], SlotState._fields.index("positions"))


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "meda", "vl_cache", "madakv", "hae"])
def test_compiled_schedule_equals_the_eager_schedule(method):
    """The graph and the eager path run the same schedule classes; their kept slots agree layer by layer."""
    tiny = build("llava", layers=4)
    options = {"window": 4} if "window" in mmkv_compile.methods()[method]["parameters"] else {}
    if method == "hae":
        options = {"global_threshold": 0.5, "individual_threshold": 1.0}
    compiled = mmkv_compile.compile(build("llava", layers=4).model, method, 0.25, inductor=False, **options)
    eager = mmkv_compile.apply_eagerly(build("llava", layers=4).model, method, 0.25, **options)
    caches = []
    for model in (compiled, eager):
        with torch.no_grad():
            caches.append(output_cache(model(**tiny.inputs, use_cache=True)))
    for ours, theirs in zip(caches[0].mmkv_layers, caches[1].mmkv_layers, strict=True):
        assert torch.equal(ours.positions, theirs.positions)
    total = sum(int((layer.labels[0, 0] != INVALID).sum()) for layer in caches[0].mmkv_layers)
    assert total <= 4 * math.floor(0.25 * tiny.inputs["input_ids"].shape[1])
