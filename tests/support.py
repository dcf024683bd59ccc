"""What the tests share: operator states and calls, tiny models, greedy generation, and the graph test backend
(vLLM's ``TestBackend`` shape: it runs the passes and keeps the op counts before and after)."""

from __future__ import annotations

import torch
import torch.fx as fx

from mmkv_compile.api import CompiledForward, install_output_hooks
from mmkv_compile.backend import MMKVBackend
from mmkv_compile.compat import output_cache
from mmkv_compile.config import CompressionConfig
from mmkv_compile.labels import Modality
from mmkv_compile.methods import build_method
from mmkv_compile.passes.find_sites import cache_appends
from mmkv_compile.state import SlotState
from mmkv_compile.testing.tiny import BUILDERS

INVALID, TEXT, IMAGE = int(Modality.INVALID), int(Modality.TEXT), int(Modality.IMAGE)
SCORE_EVICT_MERGE = torch.ops.mmkv.score_evict_merge.default


# -- the operator ----------------------------------------------------------------------------------------


def slot_state(keys, labels=None, *, values=None, positions=None, scores=None, weights=None, parked=None) -> SlotState:
    """A state over ``keys [B, Hkv, S, D]``: text slots at positions 0..S-1, values equal to the keys, no score
    history, weight 1, nothing parked, unless given."""
    batch, heads, seq, _ = keys.shape
    shape = (batch, heads, seq)
    return SlotState(
        keys=keys,
        values=keys.clone() if values is None else values,
        labels=torch.zeros(shape, dtype=torch.int8) if labels is None else labels.expand(shape).contiguous(),
        positions=torch.arange(seq).expand(shape).contiguous() if positions is None else positions,
        scores=torch.zeros(shape) if scores is None else scores,
        weights=torch.ones(shape) if weights is None else weights,
        parked=torch.zeros(shape, dtype=torch.bool) if parked is None else parked,
    )


def random_state(batch=1, kv_heads=2, seq=10, dim=8, groups=2, num_new=None, seed=None):
    """(query, state) with random keys, values and scores; ``num_new`` queries (all slots by default)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    num_new = seq if num_new is None else num_new
    query = torch.randn(batch, kv_heads * groups, num_new, dim, generator=generator)
    keys = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    values = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    scores = torch.rand(batch, kv_heads, seq, generator=generator)
    return query, slot_state(keys, values=values, scores=scores)


def policy_of(method: str, budget, **params):
    """A method's policy at ``budget`` (validated as the backend validates it)."""
    preset = build_method(method, **params)
    preset.validate(budget)
    return preset.policy(budget)


def run_op(policy, query, state: SlotState, prefill=True, scaling=1.0, **budgets) -> SlotState:
    """``mmkv::score_evict_merge`` with a policy object."""
    out = torch.ops.mmkv.score_evict_merge(query, *state, scaling, policy.to_string(), prefill, **budgets)
    return SlotState(*out)


def kept_positions(out: SlotState, row: int = 0, head: int = 0) -> list[int]:
    """Positions of the valid slots of one row and KV head."""
    labels, positions = out.labels[row, head], out.positions[row, head]
    return positions[labels != INVALID].tolist()


# -- models ------------------------------------------------------------------------------------------------


def build(name: str, attn: str = "sdpa", **kwargs):
    """A fresh tiny model (same seed, so the same weights, every time)."""
    return BUILDERS[name](attn=attn, **kwargs)


def generate(model, inputs: dict, steps: int = 8):
    """Greedy generate: (new token ids, per-step logits [B, steps, V], the cache)."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
    prompt_len = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt_len:], torch.stack(out.logits, dim=1), output_cache(out)


def valid_slots(cache) -> list[torch.Tensor]:
    """Per compressed layer, the valid slots of each row and KV head, ``[B, Hkv]``."""
    return [(layer.labels != INVALID).sum(-1) for layer in cache.mmkv_layers]


# -- the graph test backend ---------------------------------------------------------------------------------


def count_ops(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


class CaptureBackend(MMKVBackend):
    """The mmkv backend (without Inductor) that also keeps every captured graph before and after the passes;
    ``op_counts(target)`` gives (before, after) for the last graph kept."""

    def __init__(self, **options):
        super().__init__(CompressionConfig.from_options({"inductor": False, **options}))
        self.graphs: list[tuple[fx.GraphModule, fx.GraphModule]] = []

    def rewrite(self, gm):
        new_gm, report = super().rewrite(gm)
        self.graphs.append((gm, new_gm))  # the passes rewrite a copy: gm is the graph before
        return new_gm, report

    @property
    def report(self):
        return self.reports[-1]

    @property
    def graph(self) -> fx.Graph:
        return self.graphs[-1][1].graph

    def op_counts(self, target) -> tuple[int, int]:
        before, after = self.graphs[-1]
        return count_ops(before, target), count_ops(after, target)

    def nodes(self, target) -> list[fx.Node]:
        """The rewritten graph's calls to ``target``, in order."""
        return [n for n in self.graph.nodes if n.op == "call_function" and n.target is target]

    def keep_decoder_graph(self) -> CaptureBackend:
        """Keep only the graph that appends to the cache (the decoder's), for counting its nodes."""
        for index, (before, after) in enumerate(self.graphs):
            if cache_appends(after.graph):
                self.graphs, self.reports = [(before, after)], [self.reports[index]]
                break
        return self


def compile_with(model, backend: MMKVBackend):
    """``model``'s forward compiled with ``backend`` exactly as ``mmkv_compile.compile`` compiles it."""
    install_output_hooks(model)
    return CompiledForward(model, backend, None, None)
