"""The backend's own route for ``torch.compile(model, backend="mmkv", options=...)`` called without a cache.

Such a call makes the model create a plain ``DynamicCache`` inside the traced graph, and a ``DynamicCache``
cannot be compressed: its physical length is where new tokens' positions continue. So when the backend first
sees such a graph, it gives the call an :class:`~mmkv_compile.cache.MMKVCache` instead, as
``mmkv_compile.compile`` does, and asks Dynamo to trace the frame again, now with the new cache. It also registers a forward pre-hook on the model that does
the same for every later call: a call without a cache gets an ``MMKVCache``, and a call that passes
an ``MMKVCache`` gets its new tokens' labels. The hook does nothing outside a ``torch.compile`` region, so the
uncompiled model behaves as it did.

Dynamo offers a backend no handle on the module it traces; the traced frame's locals are read from the frame
being translated (``InstructionTranslator.current_tx``), and the retrace starts from an empty speculation log:
the internal names this route depends on. Where they fail, nothing is adopted and the backend warns as before.
"""

from __future__ import annotations

import functools
import os
import sys
import types
import weakref
from typing import Any

import torch
from torch._dynamo import config as dynamo_config

try:  # Dynamo's recompile regions (torch 2.13); without them a model's calls count where torch.compile says
    from torch._C._dynamo.eval_frame import (
        _get_cache_entries_for_region,
        get_eval_frame_isolate_recompiles_id,
        set_eval_frame_isolate_recompiles_id,
    )
    from torch._dynamo.eval_frame import _next_isolate_recompiles_id, skip_code
except ImportError:
    _next_isolate_recompiles_id = None

from mmkv_compile.compat import call_cache, takes_a_cache


class RetraceWithMMKVCache(torch._dynamo.exc.TensorifyScalarRestartAnalysis):
    """Raised by the backend to make Dynamo trace the frame again, now that its call has an MMKVCache.

    Dynamo restarts a frame's analysis on ``RestartAnalysis``, but lets only this subclass of it through from a
    backend; a backend's ``SkipFrame`` instead marks the frame's code (transformers' shared decorator frame) as
    skipped for every later compile in the process."""


@torch.compiler.disable
def give_mmkv_cache(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
    """Forward pre-hook (with kwargs): give a call without a cache an MMKVCache and tell an MMKVCache the labels
    of the tokens it will append. It runs eagerly; uncompiled, an MMKVCache behaves as a ``DynamicCache``."""
    from mmkv_compile.api import prepare_call
    from mmkv_compile.cache import MMKVCache

    if kwargs.get("use_cache") is False:
        return None
    cache = call_cache(kwargs)
    if cache is not None and not isinstance(cache, MMKVCache):
        return None  # the user's own cache: theirs to keep
    return args, prepare_call(module, args, kwargs)


def _is_hooked(model) -> bool:
    return any(hook is give_mmkv_cache for hook in model._forward_pre_hooks.values())


def hook(model) -> bool:
    """Give ``model``'s later calls an MMKVCache (a forward pre-hook), the output hooks that read its labels,
    and a forward that counts its compiles in a recompile region of its own; True when it was not hooked yet."""
    from mmkv_compile.api import install_output_hooks

    if _is_hooked(model):
        return False
    install_output_hooks(model)
    model.register_forward_pre_hook(give_mmkv_cache, with_kwargs=True)
    if "forward" not in model.__dict__ and _next_isolate_recompiles_id is not None:
        model.forward = own_forward(model)
    return True


def own_forward(model: torch.nn.Module):
    """The model's forward, bound to it, whose calls Dynamo counts in a recompile region of the model's own.

    Dynamo counts compiles against ``recompile_limit`` (8) per code object, and every transformers model's
    forward runs through frames all models share (5.24's ``deprecate_kwarg`` decorator; after a graph break, the
    frames it resumes in). Each model compiled with ``torch.compile(backend="mmkv")`` used to spend two or three
    of those 8: the fifth model in a process ran uncompiled and uncompressed. Now only what a model's first call
    compiles before its first graph reaches the backend counts there; the rest counts in a region of its own, as
    if compiled with ``isolate_recompiles=True`` (``mmkv_compile.compile`` passes it). Its calls also lift
    Dynamo's process-wide cap, as ``mmkv_compile.compile``'s do (``api._own_recompile_limit``)."""

    def forward(self, *args, **kwargs):
        # Only C functions and torch's own (which Dynamo never compiles) run here: any other Python function
        # this frame calls is a frame Dynamo would compile.
        if get_eval_frame_isolate_recompiles_id() != DEFAULT_REGION:  # the user's torch.compile isolates its own
            return type(self).forward(self, *args, **kwargs)
        if self not in _regions:  # a copy.deepcopy of an adopted model
            _regions[self] = next(_next_isolate_recompiles_id)
        prior_region = set_eval_frame_isolate_recompiles_id(_regions[self])
        # Set directly: api._own_recompile_limit's generator would be a frame Dynamo compiles, and every decode
        # step passes here, where setting and restoring took 7 us against config.patch's 87 (timeit, this CPU,
        # 2026-12-05).
        prior_cap, dynamo_config.accumulated_recompile_limit = dynamo_config.accumulated_recompile_limit, sys.maxsize
        try:
            return type(self).forward(self, *args, **kwargs)
        finally:
            dynamo_config.accumulated_recompile_limit = prior_cap
            set_eval_frame_isolate_recompiles_id(prior_region)

    _regions[model] = next(_next_isolate_recompiles_id)
    functools.update_wrapper(forward, type(model).forward)  # generate reads the forward's signature
    skip_code(forward.__code__)  # the model's frames below it are compiled; this one only sets the region
    return types.MethodType(forward, model)


DEFAULT_REGION = -1  # Dynamo's region for compiles without isolate_recompiles
_regions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model with its own forward -> its region


def count_in_own_region() -> None:
    """Count what Dynamo compiles for the rest of the call being traced in the region of the outermost model
    on the call stack: a model's first call then spends nothing of the recompile limit that every model's first
    call shares. Dynamo reads the region when it stores compiled code, after the backend returns, and the
    ``torch.compile`` wrapper restores its own region when the call returns. Only for a model that
    :func:`own_forward` gave a region (its later calls look there), and only where the call counts in the
    default region (a ``torch.compile(..., isolate_recompiles=True)`` keeps its own)."""
    model = _outer_model() if _regions else None
    if model in _regions and get_eval_frame_isolate_recompiles_id() == DEFAULT_REGION:
        set_eval_frame_isolate_recompiles_id(_regions[model])


def _model_call(frame_locals: dict) -> tuple[Any, tuple, Any]:
    """(model, positional args, kwargs) of a frame that calls a model's forward: the forward itself
    (``self``), or a decorator around it that holds the model as its first positional argument (transformers
    5.24 wraps ``forward`` in ``deprecate_kwarg``, renaming ``past_key_values`` to ``cache``)."""
    args, kwargs = frame_locals.get("args", ()), frame_locals.get("kwargs")
    model = frame_locals.get("self")
    if model is None and isinstance(args, tuple) and args and isinstance(args[0], torch.nn.Module):
        model, args = args[0], args[1:]
    return model, args, kwargs


def _takes_tokens(model, args, kwargs) -> bool:
    """A model's forward that keeps a cache, called with tokens."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not isinstance(kwargs, dict) or not isinstance(args, tuple):
        return False
    has_tokens = kwargs.get("input_ids") is not None or kwargs.get("inputs_embeds") is not None or bool(args)
    return takes_a_cache(model) and has_tokens and kwargs.get("use_cache") is not False


def _takes_tokens_without_cache(model, args, kwargs) -> bool:
    """A model's forward called with tokens and without a cache (so the model will build a DynamicCache)."""
    return _takes_tokens(model, args, kwargs) and call_cache(kwargs) is None


def adopt_traced_call() -> bool:
    """Give the call being traced an MMKVCache and hook its model for later calls; True when it did (the caller
    then raises :class:`RetraceWithMMKVCache`). Only the frame of a model's forward that Dynamo converts first
    qualifies (its first graph may be a vision tower's, before any cache is read); a user who passes a cache of
    their own keeps it."""
    from mmkv_compile.api import prepare_call

    tx = _traced_frame()
    if tx is None:
        return False
    model, args, kwargs = _model_call(tx.f_locals)
    if tx.f_code.co_name.startswith("torch_dynamo_resume") or not _takes_tokens_without_cache(model, args, kwargs):
        return False  # (the rest of a frame a graph break split started without us)
    hook(model)
    prepare_call(model, args, kwargs)  # in place: the frame is traced again with this dict
    tx.speculation_log.clear()  # the new trace takes another path through the model (it has a cache now)
    return True


def _traced_frame():
    """The frame Dynamo is converting (not an inlined call), or None where Dynamo's internals moved (the callers
    then adopt nothing and the backend warns as before)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx().output.root_tx
    except Exception:  # noqa: BLE001 - an internal name: without it, nothing is adopted
        return None


def traced_call_keeps_no_cache() -> bool:
    """The call being traced is a model's forward with ``use_cache=False``: there is no cache to compress."""
    tx = _traced_frame()
    kwargs = _model_call(tx.f_locals)[2] if tx is not None else None
    return isinstance(kwargs, dict) and kwargs.get("use_cache") is False


def uncached_outer_model():
    """The outermost model on the call stack called with tokens and without a cache: one whose call is past the
    point where it could get an MMKVCache (its graph breaks before its decoder, so Dynamo converts an inner
    frame first), or None."""
    return _outer_model(cache_given=False)


# What a graph-breaking model's first call may compile on one shared frame before its first graph reaches the
# backend: an entry for each forward the same decorator wraps on the way in (the outer model's, the inner
# model's, the language model's; LLaVA's first call compiled two on transformers 5.25).
FIRST_CALL_ENTRIES = 3


def shared_frames_spent() -> str | None:
    """After a model is newly hooked: a warning when a frame that every model's first call passes through
    (transformers' decorators, the frames a graph break resumes in) has too little of Dynamo's
    ``recompile_limit`` left in the default region for another model's first call, which is counted there before
    the backend sees the model: that model would run every call uncompiled, and nothing of mmkv would run to say
    so."""
    import transformers
    from torch._dynamo.convert_frame import input_codes

    if _next_isolate_recompiles_id is None:
        return None
    limit, root = torch._dynamo.config.recompile_limit, os.path.dirname(transformers.__file__)
    codes = [ref() for ref in list(input_codes.seen)]  # every code object Dynamo converted (weak references)
    spent = {
        f"{code.co_name} ({os.path.relpath(code.co_filename, root)}:{code.co_firstlineno})"
        for code in codes
        if code is not None and code.co_filename.startswith(root)
        and len(_get_cache_entries_for_region(code, DEFAULT_REGION)) + FIRST_CALL_ENTRIES > limit
    }  # fmt: skip
    if not spent:
        return None
    return (
        f"Dynamo's recompile_limit ({limit}) is nearly spent for frames every model's first call passes through "
        f"({', '.join(sorted(spent))}): the next model whose graph breaks before its decoder (a VLM) compiled with "
        'torch.compile(backend="mmkv") and default arguments may run every call uncompiled and uncompressed, '
        "with no warning from mmkv; compile it with mmkv_compile.compile(...), or pass recompile_limit=64, "
        "isolate_recompiles=True to torch.compile"
    )


def _outer_model(cache_given: bool = True):
    """The outermost model on the call stack called with tokens (and, unless ``cache_given``, without a cache)."""
    frame, outer = sys._getframe(1), None
    while frame is not None:
        model, args, kwargs = _model_call(frame.f_locals)
        if _takes_tokens(model, args, kwargs) and (cache_given or call_cache(kwargs) is None):
            outer = model
        frame = frame.f_back
    return outer


NO_CACHE_REASON = (
    "use_cache=False: the model keeps no KV cache, so there is nothing to compress (each step attends the whole "
    "sequence again); pass use_cache=True to compress"
)
FIRST_CALL_REASON = (
    "this first call ran uncompressed: the model's graph breaks before its decoder, where the call was already "
    "past the point where mmkv could give it an MMKVCache; its later calls without a cache get one and compress "
    "(mmkv_compile.compile(model, ...) compresses from the first call)"
)

__all__ = [
    "FIRST_CALL_REASON",
    "NO_CACHE_REASON",
    "RetraceWithMMKVCache",
    "adopt_traced_call",
    "give_mmkv_cache",
    "hook",
    "own_forward",
    "shared_frames_spent",
    "traced_call_keeps_no_cache",
    "uncached_outer_model",
]
