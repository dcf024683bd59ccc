"""Public entry points: ``compile`` (for generate), ``apply_eagerly`` (the uncompiled reference), ``explain``."""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

from mmkv_compile.adopt import NO_CACHE_REASON
from mmkv_compile.backend import MMKVBackend
from mmkv_compile.cache import CAPACITY_CHUNK, MMKVCache, MMKVLayer
from mmkv_compile.compat import cache_argument, call_cache, head_group, pop_cache
from mmkv_compile.config import CompressionConfig
from mmkv_compile.masks import slot_attention_mask
from mmkv_compile.passes.find_sites import CacheKind
from mmkv_compile.reports import DECODE, PREFILL, ExplainReport, GraphReport, Warner
from mmkv_compile.schedules import EagerEmitter, LayerStep, schedule_for

__all__ = ["ExplainReport", "apply_eagerly", "compile", "compiled_reports", "explain", "uncompile"]


def _options(method: str, budget: float | int, inductor: bool, method_options: dict) -> dict[str, Any]:
    return {"method": method, "budget": budget, "inductor": inductor, **method_options}


def install_output_hooks(model: torch.nn.Module) -> None:
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


def _length(input_ids: torch.Tensor | None, embeds: torch.Tensor | None) -> int | None:
    """How many tokens a call with these inputs appends."""
    return input_ids.shape[-1] if input_ids is not None else (embeds.shape[1] if embeds is not None else None)


def _room_after(prompt: int | None, capacity: int | None) -> int | None:
    """Slots a cache of ``capacity`` has beyond a ``prompt``: what generate will still append."""
    return None if capacity is None or prompt is None else max(capacity - prompt, 1)


def _static_capacity(cache: Any) -> int | None:
    """The longest of a ``StaticCache``'s fixed layer lengths."""
    lengths = [getattr(layer, "max_cache_len", None) for layer in getattr(cache, "layers", ())]
    return max((n for n in lengths if isinstance(n, int)), default=None)


def prepare_call(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Before a forward call: give it an :class:`MMKVCache` under the name the model's forward takes it
    (``cache`` or ``past_key_values``), and tell the cache the modality labels of the tokens it will append.

    An empty ``DynamicCache`` (what ``generate`` creates) is replaced. So is an empty ``StaticCache``
    (``cache_implementation="static"``): fixed-size buffers cannot shrink, so the call gets an MMKVCache of fixed
    capacity instead, whose decode steps write in place into buffers sized once for what the StaticCache would
    have held beyond the prompt (static decode shapes, as a StaticCache gives)."""
    if kwargs.get("use_cache") is False:
        return kwargs
    cache = pop_cache(kwargs)
    heads = head_group(model)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    new_len = _length(input_ids, embeds)
    if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
        cache = MMKVCache(model.config, heads=heads)
    elif isinstance(cache, StaticCache) and cache.get_seq_length() == 0:
        cache = MMKVCache(model.config, heads=heads, room=_room_after(new_len, _static_capacity(cache)))
    elif isinstance(cache, MMKVCache) and cache.heads != heads:
        raise ValueError(
            f"the model's KV heads are split over process group {heads!r} (tensor parallelism) but the MMKVCache "
            f"passed was built for {cache.heads!r}: build it as MMKVCache(model.config, heads=head_group(model)) "
            "(mmkv_compile.compat.head_group), or pass none"
        )
    kwargs[cache_argument(model)] = cache
    if isinstance(cache, MMKVCache):
        type_ids = kwargs.get("mm_token_type_ids")
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


# Dynamo keeps compiled code, and counts recompiles against a limit (8), per code object, and every
# transformers model's forward runs through one shared decorator frame. So each compiled model gets an entry
# function with a code object of its own (see _entry), and its own recompile count and limit for the frames it
# still shares with other models (a graph break's resume functions): torch.compile's isolate_recompiles.
RECOMPILE_LIMIT = 64
_entries = itertools.count()


def _entry(forward):
    """A function that calls ``forward``, with a code object no other compiled model shares: what one model
    compiled (its guards, its recompiles, a fallback) never changes what another one gets."""

    def entry(*args, **kwargs):
        return forward(*args, **kwargs)

    entry.__code__ = entry.__code__.replace(co_name=f"mmkv_forward_{next(_entries)}")
    return entry


@contextlib.contextmanager
def _own_recompile_limit():
    """Lift Dynamo's process-wide cap on compiles per code object (``accumulated_recompile_limit``, 256) for this
    call. The cap counts every compile a frame ever had, for every model, freed or not, and a graph break resumes
    in transformers frames all models share: a process that compiled enough models before this one (a notebook, a
    test run) would run it eagerly, uncompressed. Each model's own ``recompile_limit`` (per frame, in its
    isolated region) still bounds what it compiles."""
    with torch._dynamo.config.patch(accumulated_recompile_limit=sys.maxsize):
        yield


@contextlib.contextmanager
def _floats_constant():
    """Trace this model's Python floats (its attention scale) as constants. A graph break in the model's own code
    (LLaVA's placeholder check) resumes in a frame every model of that class shares, and Dynamo remembers what
    changed there between models: after a LLaVA of another head size, the scale came in as a symbolic float. The
    passes hand such a scale to the operator at run time (the route where mmkv does not call torch.compile), but
    its decode graphs lose Inductor's C++ wrapper (``backend._symbolic_operator_float``). Constant floats guard
    on their value instead: each model compiles that frame with its own scale, as in a fresh process."""
    with torch._dynamo.config.patch(specialize_float=True):
        yield


# The cache's lengths grow by one every decode step. Left to Dynamo, the first decode graph specializes them and
# the second step compiles the graph again with them symbolic; declared dynamic, decoding compiles once.
_CACHE_LENGTHS = r".*\.layers\[\d+\]\.(filled|logical_length)$"


@contextlib.contextmanager
def _decode_lengths_dynamic(kwargs: dict):
    """Mark what grows each decode step (the cache's slot counts, the attention mask's columns) dynamic."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        torch._dynamo.maybe_mark_dynamic(mask, 1)
    sources = ",".join(filter(None, (torch.compiler.config.dynamic_sources, _CACHE_LENGTHS)))  # keep the user's
    with torch.compiler.config.patch(dynamic_sources=sources):
        yield


class CompiledForward:
    """A model's forward, compiled with the mmkv backend: gives every call an :class:`MMKVCache` and its labels,
    and checks that each phase (prefill, decode) really went through the backend.

    When the method evicts nothing while decoding, one-token decode calls append in place: the cache reserves
    capacity buffers before each one (``MMKVCache.reserve``) and its state fields are synced after it. A
    follow-up prompt (several tokens appended after the prompt) is appended by copying and compressed."""

    def __init__(self, model: torch.nn.Module, backend: MMKVBackend, mode: str | None, dynamic: bool | None):
        self.model, self.backend = model, backend
        self.original = type(model).forward.__get__(model)
        self.compiled = torch.compile(
            _entry(self.original), backend=backend, mode=mode, dynamic=dynamic,
            recompile_limit=RECOMPILE_LIMIT, isolate_recompiles=True,
        )  # fmt: skip
        self.checked: set[str] = set()
        policy = backend.config.policy
        self.appends_in_place = not (policy.evict_while_decoding or policy.keeps_everything)
        self.new_tokens: int | None = None  # what the running generate() will append (CompiledGenerate sets it)
        functools.update_wrapper(self, self.original)  # generate reads the forward's signature

    @property
    def reports(self) -> list[GraphReport]:
        """Every graph the backend rewrote for this model."""
        return self.backend.reports

    def __call__(self, *args, **kwargs):
        kwargs = prepare_call(self.model, args, kwargs)
        cache = call_cache(kwargs)
        if kwargs.get("use_cache") is False:
            self.backend.warner.warn(f"mmkv ({self.backend.config.method.name}): {NO_CACHE_REASON}", stacklevel=3)
        phase = DECODE if isinstance(cache, MMKVCache) and cache.get_seq_length() > 0 else PREFILL
        incoming = cache.incoming_labels if isinstance(cache, MMKVCache) else None
        one_token = incoming is not None and incoming.shape[-1] == 1
        if phase == DECODE and not one_token:  # a follow-up prompt: appended by copying, then compressed
            cache.release()
        in_place = phase == DECODE and one_token and self._decodes_in_place()
        if in_place:
            cache.reserve(incoming.shape[-1], room=cache.room or self.new_tokens or CAPACITY_CHUNK)
        compiled_before = len(self.reports)
        lengths = _decode_lengths_dynamic(kwargs) if phase == DECODE else contextlib.nullcontext()
        with _own_recompile_limit(), _floats_constant(), lengths:
            out = self.compiled(*args, **kwargs)
        if in_place:
            cache.sync_views()
            self._check_in_place(self.reports[compiled_before:])
        if isinstance(cache, MMKVCache) and phase not in self.checked:
            self._check(phase, cache)
        return out

    def _decodes_in_place(self) -> bool:
        """Whether decode steps may write into capacity buffers: the method evicts nothing while decoding, and
        every prompt graph was rewritten whole (each layer compressed, no warning), so the decode graphs' masks
        will be rebuilt too. Otherwise decoding appends by copying, as it always could."""
        prompts = [r for r in self.reports if r.phase == PREFILL]
        return (
            self.appends_in_place
            and bool(prompts)
            and all(r.compresses() and not r.fallback and not r.warnings for r in prompts)
        )

    def _check_in_place(self, new_reports: list[GraphReport]) -> None:
        """A decode graph compiled for capacity buffers must hide their unused slots from every MMKVCache site."""
        for report in new_reports:
            blind = [s.layer for s in report.sites if s.cache == CacheKind.MMKV.value and not s.mask_rebuilt]
            if report.fallback or blind or report.warnings:
                why = report.fallback or (f"the attention masks of layers {blind} were not rebuilt" if blind else
                                          report.warnings[0])  # fmt: skip
                raise RuntimeError(
                    f"mmkv ({self.backend.config.method.name}): a decode graph over capacity buffers was compiled "
                    f"without the mmkv rewrite ({why}); running it would attend the buffers' unused slots"
                )

    def _check(self, phase: str, cache: MMKVCache) -> None:
        self.checked.add(phase)
        if any(r.phase == phase for r in self.reports):
            return
        why = (
            f"mmkv ({self.backend.config.method.name}): the {phase} step ran without reaching the mmkv backend: "
            "Dynamo ran it eagerly (see TORCH_LOGS=recompiles; its recompile_limit may be spent) or captured no "
            "graph that updates the cache"
        )
        if cache.is_compressed():
            raise RuntimeError(why + "; the cache is already compressed, so running on would attend wrong slots")
        self.backend.warner.warn(why + "; this step is not compressed", stacklevel=4)


# generate's cache_implementation values for a StaticCache (the last three are its deprecated names); the offloaded
# ones keep their StaticCache, left alone with a warning.
FIXED_SIZE_CACHES = ("static", "sliding_window", "hybrid", "hybrid_chunked")


def _first_set(*names: str, kwargs: dict[str, Any], config) -> Any:
    """The first of ``names`` set in generate's keyword arguments or, failing that, in its generation config."""
    for name in names:
        value = kwargs.get(name, getattr(config, name, None))
        if value is not None:
            return value
    return None


class CompiledGenerate:
    """A compiled model's ``generate``: tells its :class:`CompiledForward` how many tokens the call may append,
    so the capacity buffers are sized once for the whole generation."""

    def __init__(self, model: torch.nn.Module, forward: CompiledForward):
        self.model, self.forward = model, forward
        self.original = type(model).generate.__get__(model)
        functools.update_wrapper(self, self.original)

    def __call__(self, *args, **kwargs):
        config = kwargs.get("generation_config") or self.model.generation_config
        self.forward.new_tokens = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        self._replace_static_cache(args, kwargs, config)
        # With a StaticCache on a GPU, generate would wrap the forward in a torch.compile of its own, whose trace
        # runs through this compiled forward without reaching the mmkv backend.
        kwargs.setdefault("disable_compile", True)
        try:
            return self.original(*args, **kwargs)
        finally:
            self.forward.new_tokens = None

    def _replace_static_cache(self, args: tuple, kwargs: dict[str, Any], config) -> None:
        """Give generate an MMKVCache of fixed capacity where it would use an empty StaticCache (its own, from
        ``cache_implementation="static"``, or one passed in): for a StaticCache, generate also builds masks sized
        to its fixed length, so the cache is replaced before generate sees it (see :func:`prepare_call`)."""
        cache = call_cache(kwargs)
        implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        prompt = _length(ids, kwargs.get("inputs_embeds"))
        if cache is None and implementation in FIXED_SIZE_CACHES:
            max_length = _first_set("max_cache_len", "max_length", kwargs=kwargs, config=config)
            room = self.forward.new_tokens or _room_after(prompt, max_length)
        elif isinstance(cache, StaticCache) and cache.get_seq_length() == 0:
            room = _room_after(prompt, _static_capacity(cache))
        else:
            return
        pop_cache(kwargs)
        kwargs["cache_implementation"] = None
        kwargs[cache_argument(self.model)] = MMKVCache(self.model.config, heads=head_group(self.model), room=room)


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
    config = CompressionConfig.from_options(_options(method, budget, inductor, method_options))
    head_group(model)  # a tensor-parallel model whose KV heads do not split evenly fails here, not mid-trace
    install_output_hooks(model)
    model.forward = CompiledForward(model, MMKVBackend(config), mode, dynamic)
    if hasattr(type(model), "generate"):
        model.generate = CompiledGenerate(model, model.forward)
    return model


def compiled_reports(model: torch.nn.Module) -> list[GraphReport]:
    """Every graph the mmkv backend rewrote for a model compiled with :func:`compile`."""
    forward = model.__dict__.get("forward")
    if not isinstance(forward, CompiledForward):
        raise ValueError("the model was not compiled with mmkv_compile.compile")
    return forward.reports


def uncompile(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`compile` / :func:`apply_eagerly`: the model's own forward (and generate) run again."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop("generate", None)
    return model


# -- the uncompiled reference ----------------------------------------------------------------------

REFERENCE_ATTENTION = "mmkv_reference"


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention that calls the operator eagerly: what the backend's rewritten graph computes, written as plain
    code over the same layer schedules. Registered in transformers' AttentionInterface as ``mmkv_reference``."""
    cache: MMKVCache | None = kwargs["mmkv_cache"]
    policy = kwargs["mmkv_policy"]
    layer = cache.layers[module.layer_idx] if cache is not None else None  # None: use_cache=False
    num_new = query.shape[2]
    prefill = layer is not None and layer.get_seq_length() == num_new
    scaling = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    compressible = isinstance(layer, MMKVLayer) and not policy.keeps_everything
    mask = attention_mask  # at the prompt nothing is evicted yet: transformers' mask lines up with the slots
    if compressible and not prefill:
        merge = policy.merge
        mask = slot_attention_mask(
            layer.labels, layer.positions, query, layer.window, layer.parked if merge.recycle_bin else None,
            layer.weights if merge.weighted_attention else None,
        )  # fmt: skip
    is_causal = mask is None and num_new > 1
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, is_causal=is_causal, enable_gqa=True
    )
    if compressible and (prefill or policy.evict_while_decoding or num_new > 1):  # a follow-up prompt too
        if cache.pending is None:
            cache.pending = schedule_for(policy, prefill)
        step = LayerStep(layer.placement, query, layer.state(), scaling, prefill, layer)
        kept = cache.pending.layer(EagerEmitter(), step)
        if kept is not None:
            layer.set_state(kept)
        if layer.rank == layer.count - 1:
            for done, kept in cache.pending.finish(EagerEmitter()):
                done.owner.set_state(kept)
            cache.pending = None
    return out.transpose(1, 2).contiguous(), None


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

    This is the reference the compiled model is tested against (same policy, same operator, same layer
    schedules). It works for models that route attention through transformers' ``AttentionInterface``.
    Returns ``model``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    policy = CompressionConfig.from_options(_options(method, budget, False, method_options)).policy
    AttentionInterface.register(REFERENCE_ATTENTION, reference_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE_ATTENTION, sdpa_mask)
    key = _text_attention_key(model)
    if key is None:
        raise ValueError("apply_eagerly could not find the decoder's config among the model's sub-configs")
    model.set_attn_implementation(REFERENCE_ATTENTION if key == "" else {key: REFERENCE_ATTENTION})
    original = type(model).forward.__get__(model)
    warner = Warner()

    @functools.wraps(original)
    def forward(*args, **kwargs):
        kwargs = prepare_call(model, args, kwargs)
        cache = call_cache(kwargs)
        if cache is None:
            warner.warn(f"mmkv ({method}, applied eagerly): {NO_CACHE_REASON}")
        else:
            cache.pending = None  # a step that failed half-way leaves no schedule behind
        return original(*args, mmkv_cache=cache, mmkv_policy=policy, **kwargs)

    model.forward = forward
    return model


# -- explain -----------------------------------------------------------------------------------------


def explain(
    model: torch.nn.Module,
    method: str = "snapkv",
    budget: float | int = 0.5,
    *,
    decode_steps: int = 1,
    inductor: bool = False,
    options: dict | None = None,
    **inputs,
) -> ExplainReport:
    """What ``generate`` does with ``model`` compiled by :func:`compile`: compile it the same way (without
    Inductor unless asked: the rewrite is the same), run ``generate`` on ``inputs`` for ``decode_steps`` new
    tokens after the first, and report every captured graph and every warning. ``model`` is left as it was."""
    saved = {name: model.__dict__[name] for name in ("forward", "generate") if name in model.__dict__}
    warner_given: list[str] = []
    try:
        compile(model, method, budget, inductor=inductor, **dict(options or {}))
        forward: CompiledForward = model.__dict__["forward"]
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=decode_steps + 1, min_new_tokens=decode_steps + 1,
                           do_sample=False)  # fmt: skip
        reports, warner_given = forward.reports, forward.backend.warner.given
    finally:
        uncompile(model)
        model.__dict__.update(saved)
    return ExplainReport(method, budget, reports, list(warner_given))
