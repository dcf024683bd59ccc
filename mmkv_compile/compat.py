"""Differences between the transformers releases mmkv supports (5.2 to the newest 5.x), in one place.

transformers 5.24 renamed the forward's cache argument and the outputs' cache field from ``past_key_values``
to ``cache`` (the old name still works there, with a deprecation warning). Tensor parallelism keeps its device
mesh in a private attribute whose shape changed in 5.23 (:func:`head_group`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

CACHE_ARGUMENTS = ("cache", "past_key_values")


@functools.cache
def _forward_takes(model_type: type, name: str) -> bool:
    try:
        return name in inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return False


def forward_takes(model: Any, name: str) -> bool:
    """Whether ``model``'s forward has a parameter ``name`` (read once per model class, never per instance)."""
    return _forward_takes(type(model), name)


def takes_a_cache(model: Any) -> bool:
    """Whether ``model``'s forward takes a KV cache, under either name."""
    return any(forward_takes(model, name) for name in CACHE_ARGUMENTS)


def cache_argument(model: Any) -> str:
    """The name under which ``model``'s forward takes its KV cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (earlier releases)."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache a call passes under either name; passing both is an error."""
    given = [name for name in CACHE_ARGUMENTS if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not both")
    cache = kwargs.pop(given[0]) if given else None
    for name in CACHE_ARGUMENTS:
        kwargs.pop(name, None)
    return cache


def call_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a call passes under either name, or None."""
    return next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)


def output_cache(output: Any) -> Any:
    """The cache a model or ``generate`` output returns (``.cache`` or ``.past_key_values``), or None."""
    for name in CACHE_ARGUMENTS:
        if isinstance(output, dict) and output.get(name) is not None:
            return output[name]
    return None


def head_group(model: Any) -> str:
    """The name of the process group ``model``'s KV heads are split over by transformers' tensor parallelism
    (``from_pretrained(..., tp_plan="auto")``), or "" when the model is not sharded.

    transformers keeps the mesh in a private attribute in every release mmkv supports: a 1-D mesh in 5.2, a
    ``(pp, fsdp, tp)`` mesh from 5.23. Raises ValueError when the KV heads do not divide over the ranks."""
    size = getattr(model, "tp_size", None) or 1
    if size <= 1:
        return ""
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        raise ValueError(f"the model is tensor parallel (tp_size={size}) but transformers exposes no device mesh")
    names = mesh.mesh_dim_names or ()
    group = mesh["tp"].get_group() if "tp" in names else mesh.get_group()
    config = model.config.get_text_config(decoder=True)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if kv_heads % group.size():
        raise ValueError(
            f"tensor parallelism over {group.size()} ranks needs the KV heads to divide evenly, but the decoder has "
            f"{kv_heads}: choose a world size that divides {kv_heads}"
        )
    return group.group_name


__all__ = [
    "CACHE_ARGUMENTS",
    "cache_argument",
    "call_cache",
    "forward_takes",
    "head_group",
    "output_cache",
    "pop_cache",
    "takes_a_cache",
]
