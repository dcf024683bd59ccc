"""Public entry points: ``compile`` (for generate), ``apply_eagerly`` (the uncompiled reference), ``explain``."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from mmkv_compile.backend import GraphReport, MMKVWarning, mmkv_backend
from mmkv_compile.cache import MMKVCache, MMKVLayer
from mmkv_compile.config import CompressionConfig

__all__ = ["ExplainReport", "apply_eagerly", "compile", "explain", "uncompile"]


def _options(method: str, budget: float | int, inductor: bool, method_options: dict) -> dict[str, Any]:
    return {"method": method, "budget": budget, "inductor": inductor, **method_options}


def _install_output_hooks(model: torch.nn.Module) -> None:
    """Install transformers' output-capturing hooks now: installing them inside a compiled call takes
    a lock that Dynamo cannot trace (a graph break on every cold model)."""
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # older transformers: nothing to install
        return
    submodels = [module for module in model.modules() if isinstance(module, PreTrainedModel)]
    hooked = [getattr(module, "_output_capturing_hooks_installed", False) for module in submodels]
    if any(hooked) and not hooked[0]:
        # An uncompiled call (generate runs get_image_features eagerly) hooked a submodel but not the model:
        # installing on the model would hook that submodel a second time and break its outputs. Start over.
        _remove_output_hooks(model, submodels)
    for module in submodels:
        maybe_install_capturing_hooks(module)


def _remove_output_hooks(model: torch.nn.Module, submodels: list) -> None:
    for module in model.modules():
        for handle_id, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "output_capturing_hook":
                del module._forward_hooks[handle_id]
    for module in submodels:
        module.__dict__.pop("_output_capturing_hooks_installed", None)


def prepare_call(config, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Before a forward call: give it an :class:`MMKVCache` (replacing an empty ``DynamicCache``, as
    ``generate`` creates one) and tell the cache the modality labels of the tokens it will append."""
    if kwargs.get("use_cache") is False:
        return kwargs
    cache = kwargs.get("past_key_values")
    if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
        cache = MMKVCache(config)
        kwargs["past_key_values"] = cache
    if isinstance(cache, MMKVCache):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        type_ids = kwargs.get("mm_token_type_ids")
        new_len = input_ids.shape[-1] if input_ids is not None else (embeds.shape[1] if embeds is not None else None)
        if type_ids is not None and type_ids.shape[-1] != new_len:
            type_ids = None  # generate keeps the prompt's type ids around while decoding
        cache.observe(input_ids, kwargs.get("attention_mask"), type_ids, embeds)
        if new_len == 1:
            # A one-token step is a decode step: keep its length static instead of letting Dynamo share a
            # symbol with the prompt length (mask builders specialize it to 1 and the trace fails).
            for tensor in (input_ids, embeds):
                if tensor is not None:
                    torch._dynamo.mark_static(tensor, 1)
    return kwargs


def _wrap_forward(model: torch.nn.Module, run) -> None:
    original = type(model).forward.__get__(model)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        return run(*args, **prepare_call(model.config, args, kwargs))

    model.forward = forward


# Every transformers model's forward runs through one shared decorator frame, so Dynamo's per-frame
# recompile limit (8) is shared by all models in a process; past it Dynamo runs eagerly. Our calls
# raise it for themselves only.
RECOMPILE_LIMIT = 256


class _CompiledForward:
    """Calls the compiled forward and checks that every phase really went through the mmkv backend."""

    def __init__(self, compiled, reports: list[GraphReport]):
        self.compiled, self.reports = compiled, reports
        self.checked: set[str] = set()

    def __call__(self, *args, **kwargs):
        cache = kwargs.get("past_key_values")
        phase = "decode" if isinstance(cache, MMKVCache) and cache.get_seq_length() > 0 else "prefill"
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            out = self.compiled(*args, **kwargs)
        if isinstance(cache, MMKVCache) and phase not in self.checked:
            self._check(phase, cache)
        return out

    def _check(self, phase: str, cache: MMKVCache) -> None:
        if any(r.phase == phase for r in self.reports):
            self.checked.add(phase)
            return
        why = (
            f"the {phase} step ran without reaching the mmkv backend: Dynamo ran it eagerly (see TORCH_LOGS=recompiles; "
            f"its recompile_limit may be spent) or captured no graph that updates the cache"
        )
        compressed = any(layer.get_physical_length() < layer.get_seq_length() for layer in cache.mmkv_layers)
        if compressed:
            raise RuntimeError(why + "; the cache is already compressed, so running on would attend wrong slots")
        warnings.warn(why + "; this step is not compressed", MMKVWarning, stacklevel=3)
        self.checked.add(phase)


def compile(
    model: torch.nn.Module,
    method: str = "snapkv",
    budget: float | int = 0.5,
    *,
    inductor: bool = True,
    mode: str | None = None,
    dynamic: bool | None = None,
    **method_options,
) -> torch.nn.Module:
    """Compile ``model`` in place with the mmkv backend, so that ``model.generate`` and plain calls
    compress the KV cache. Options are validated before anything is compiled. Returns ``model``.

    ``torch.compile(model).generate()`` never reaches any backend (generate calls the uncompiled
    module); this function compiles the forward that generate calls.
    """
    reports: list[GraphReport] = []
    options = _options(method, budget, inductor, method_options)
    CompressionConfig.from_options(options)  # raise on bad options now, not at the first call
    _install_output_hooks(model)
    original = type(model).forward.__get__(model)
    compiled = torch.compile(
        original, backend=mmkv_backend, options={**options, "_report": reports}, mode=mode, dynamic=dynamic
    )
    _wrap_forward(model, _CompiledForward(compiled, reports))
    model.forward.mmkv_reports = reports  # every graph the backend rewrote, as explain reports them
    return model


def uncompile(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`compile` / :func:`apply_eagerly`: the model's own forward runs again."""
    model.__dict__.pop("forward", None)
    return model


# -- the uncompiled reference ----------------------------------------------------------------------

REFERENCE_ATTENTION = "mmkv_reference"
_FULL_POLICY = CompressionConfig.from_options({"method": "full"}).policy


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention that calls the operator eagerly: what the backend's rewritten graph computes, written
    as plain code. Registered in transformers' AttentionInterface under ``mmkv_reference``."""
    from mmkv_compile.masks import slot_attention_mask

    cache: MMKVCache = kwargs["mmkv_cache"]
    policy = kwargs["mmkv_policy"]
    layer = cache.layers[module.layer_idx]
    if not isinstance(layer, MMKVLayer):  # sliding or chunked: transformers' layer and mask, untouched
        policy = _FULL_POLICY
    policy = policy.at_layer(module.layer_idx, cache.num_decoder_layers or len(cache.layers))
    num_new = query.shape[2]
    prefill = key.shape[-2] == num_new
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if prefill or policy.method == "full":
        mask = attention_mask  # nothing evicted yet: transformers' mask lines up with the slots
    else:
        uses_weights = policy.recycle_bin > 0 or policy.weighted_attention
        weights = layer.weights if uses_weights else None
        mask = slot_attention_mask(layer.labels, layer.positions, query, None, weights, policy.weighted_attention)
    is_causal = mask is None and num_new > 1
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, is_causal=is_causal, enable_gqa=True
    )
    if policy.method == "full" or not (prefill or policy.evict_while_decoding):
        return out.transpose(1, 2).contiguous(), None
    if policy.layer_schedule in ("allocated", "compensated") and prefill:
        _defer_until_last_layer(cache, layer, module.layer_idx, query, float(scaling), policy)
    elif policy.layer_schedule == "broadcast" and prefill:
        _broadcast_first_layer(cache, layer, module.layer_idx, query, float(scaling), policy)
    else:
        state = torch.ops.mmkv.score_evict_merge(query, *layer.state(), float(scaling), policy.to_string(), prefill)
        layer.set_state(state)
    return out.transpose(1, 2).contiguous(), None


def _broadcast_first_layer(cache: MMKVCache, layer: MMKVLayer, layer_idx: int, query, scaling: float, policy) -> None:
    """Index broadcasting, eagerly: the first compressible layer decides, later layers keep its positions."""
    noted = cache.__dict__.setdefault("_first_kept_positions", {})
    first = noted.get("positions")
    state = torch.ops.mmkv.score_evict_merge(
        query, *layer.state(), scaling, policy.to_string(), True, keep_positions=first
    )
    layer.set_state(state)
    noted["positions"] = state[3][:, 0] if first is None else first
    if layer_idx == cache.last_mmkv_layer():
        noted.clear()


def _defer_until_last_layer(cache: MMKVCache, layer: MMKVLayer, layer_idx: int, query, scaling: float, policy) -> None:
    """Cross-layer allocation, eagerly: note each layer's signal; after the last compressible layer,
    allocate the budgets and compress every noted layer (what the passes build into the prefill graph)."""
    pending = cache.__dict__.setdefault("_pending_layers", [])
    if policy.score == "window":  # as the passes do: only the queries the score reads are held
        query = query[:, :, -policy.window :]
    seen = (query, layer.keys, layer.labels, layer.positions, scaling)
    if policy.layer_schedule == "allocated":
        signal = torch.ops.mmkv.layer_signal(*seen, policy.layer_signal)
    else:
        signal = torch.ops.mmkv.head_demand(*seen, policy.to_string())
    pending.append((layer, query, scaling, policy, signal))
    if layer_idx != cache.last_mmkv_layer():
        return
    signals = [noted[4] for noted in pending]
    if policy.layer_schedule == "allocated":
        budgets = torch.ops.mmkv.allocate_layer_budgets(
            signals, float(policy.budget), float(policy.layer_floor), policy.allocation
        )
        keyword = "budget_fractions"
    else:
        budgets = torch.ops.mmkv.compensate_layer_budgets(signals, float(policy.budget), float(policy.compensation_cap))
        keyword = "head_budgets"
    for number, (noted, noted_query, noted_scaling, noted_policy, _) in enumerate(pending):
        state = torch.ops.mmkv.score_evict_merge(
            noted_query, *noted.state(), noted_scaling, noted_policy.to_string(), True, **{keyword: budgets[number]}
        )
        noted.set_state(state)
    pending.clear()


def _text_attention_key(model: torch.nn.Module) -> str | None:
    """The sub-config key of the decoder that owns the cache ("" when the top config is the decoder)."""
    config = model.config
    text = config.get_text_config(decoder=True)
    if text is config:
        return ""
    for key in getattr(config, "sub_configs", {}):
        if getattr(config, key, None) is text:
            return key
    return None


def apply_eagerly(model: torch.nn.Module, method: str = "snapkv", budget: float | int = 0.5, **method_options):
    """Apply a method without compiling: the decoder's attention calls the operator eagerly.

    This is the reference the compiled model is tested against (same policy, same operator). It works
    for models that route attention through transformers' ``AttentionInterface``. Returns ``model``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = CompressionConfig.from_options(_options(method, budget, False, method_options))
    policy = config.policy
    AttentionInterface.register(REFERENCE_ATTENTION, _reference_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE_ATTENTION, sdpa_mask)
    key = _text_attention_key(model)
    if key is None:
        raise ValueError("apply_eagerly could not find the decoder's config among the model's sub-configs")
    model.set_attn_implementation(REFERENCE_ATTENTION if key == "" else {key: REFERENCE_ATTENTION})
    original = type(model).forward.__get__(model)

    def run(*args, **kwargs):
        kwargs.setdefault("past_key_values", MMKVCache(model.config))
        return original(*args, mmkv_cache=kwargs["past_key_values"], mmkv_policy=policy, **kwargs)

    _wrap_forward(model, run)
    return model


# -- explain -----------------------------------------------------------------------------------------


@dataclass
class ExplainReport:
    """Every graph captured while running a prompt (and a decode step), with each attention site."""

    method: str
    budget: float | int
    graphs: list[GraphReport] = field(default_factory=list)

    def sites(self):
        """All site reports, with their graph's phase."""
        return [(g.phase, s) for g in self.graphs for s in g.sites]

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def __str__(self) -> str:
        lines = [f"mmkv explain: method={self.method} budget={self.budget}, {len(self.graphs)} graph(s)"]
        for g in self.graphs:
            lines.append(
                f"graph {g.index} [{g.phase}] passes: {g.passes}" + (f" FALLBACK: {g.fallback}" if g.fallback else "")
            )
            for s in g.sites:
                layer = "-" if s.layer is None else s.layer
                what = (
                    "evict+mask"
                    if s.evicts and s.mask_rebuilt
                    else "evict"
                    if s.evicts
                    else "mask"
                    if s.mask_rebuilt
                    else "no"
                )
                why = f"  ({s.reason})" if s.reason else ""
                lines.append(
                    f"  layer {layer:>3}  {s.kind:<5} cache={s.cache:<13} gqa={s.gqa_groups}  rewritten={what}{why}"
                )
        return "\n".join(lines)


def explain(
    model: torch.nn.Module,
    method: str = "snapkv",
    budget: float | int = 0.5,
    *,
    decode_steps: int = 1,
    options: dict | None = None,
    **inputs,
) -> ExplainReport:
    """Compile a throwaway copy of ``model.forward`` with the mmkv backend (no Inductor), run the prompt
    ``inputs`` and ``decode_steps`` greedy steps, and report every captured graph. ``model`` is not changed."""
    collected: list[GraphReport] = []
    opts = {**_options(method, budget, False, dict(options or {})), "_report": collected}
    CompressionConfig.from_options(opts)
    _install_output_hooks(model)
    compiled = torch.compile(type(model).forward.__get__(model), backend=mmkv_backend, options=opts)
    forward = _CompiledForward(compiled, collected)
    cache = MMKVCache(model.config)
    kwargs = dict(inputs, past_key_values=cache, use_cache=True)
    with torch.no_grad():
        out = forward(**prepare_call(model.config, (), kwargs))
        mask = inputs.get("attention_mask")
        for _ in range(decode_steps):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1) if mask is not None else None
            step = {"input_ids": token, "past_key_values": cache, "use_cache": True}
            if mask is not None:
                step["attention_mask"] = mask
            out = forward(**prepare_call(model.config, (), step))
    return ExplainReport(method, budget, collected)
