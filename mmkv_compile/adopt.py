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

import sys
from typing import Any

import torch

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


def _hook(model) -> None:
    from mmkv_compile.api import install_output_hooks

    if not _is_hooked(model):
        install_output_hooks(model)
        model.register_forward_pre_hook(give_mmkv_cache, with_kwargs=True)


def _model_call(frame_locals: dict) -> tuple[Any, tuple, Any]:
    """(model, positional args, kwargs) of a frame that calls a model's forward: the forward itself
    (``self``), or a decorator around it that holds the model as its first positional argument (transformers
    5.24 wraps ``forward`` in ``deprecate_kwarg``, renaming ``past_key_values`` to ``cache``)."""
    args, kwargs = frame_locals.get("args", ()), frame_locals.get("kwargs")
    model = frame_locals.get("self")
    if model is None and isinstance(args, tuple) and args and isinstance(args[0], torch.nn.Module):
        model, args = args[0], args[1:]
    return model, args, kwargs


def _takes_tokens_without_cache(model, args, kwargs) -> bool:
    """A model's forward called with tokens and without a cache (so the model will build a DynamicCache)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not isinstance(kwargs, dict) or not isinstance(args, tuple):
        return False
    has_tokens = kwargs.get("input_ids") is not None or kwargs.get("inputs_embeds") is not None or bool(args)
    return takes_a_cache(model) and has_tokens and call_cache(kwargs) is None and kwargs.get("use_cache") is not False


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
    _hook(model)
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


def hook_outer_model() -> bool:
    """When a model's graph breaks before its decoder, Dynamo converts an inner frame first and the call is past
    the point where it could get an MMKVCache: hook the outermost model on the call stack, so its later calls
    get one. True when a model was newly hooked."""
    frame, outer = sys._getframe(1), None
    while frame is not None:
        model, args, kwargs = _model_call(frame.f_locals)
        if _takes_tokens_without_cache(model, args, kwargs):
            outer = model
        frame = frame.f_back
    if outer is None or _is_hooked(outer):
        return False
    _hook(outer)
    return True


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
    "hook_outer_model",
    "traced_call_keeps_no_cache",
]
