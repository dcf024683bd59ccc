"""Small helpers to read Dynamo (torch-IR) graphs: views, node metadata, layer indices."""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from mmkv_compile.sources import source_fingerprint

# Ops that reshape, repeat or cast a tensor without changing which token each slot is.
VIEW_METHODS = {
    "view", "reshape", "expand", "transpose", "permute", "contiguous", "repeat_interleave", "repeat",
    "to", "float", "half", "bfloat16", "type_as", "unsqueeze", "squeeze", "clone", "flatten", "type",
}  # fmt: skip
VIEW_FUNCTIONS = {
    torch.reshape, torch.transpose, torch.permute, torch.repeat_interleave, torch.unsqueeze, torch.squeeze,
    torch.flatten, torch.clone, torch.Tensor.contiguous, torch.Tensor.expand,
}  # fmt: skip
CAST_METHODS = {"to", "float", "half", "bfloat16", "type_as", "type", "contiguous"}

SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
SOFTMAX_TARGETS = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul}
DROPOUT_TARGETS = {torch.nn.functional.dropout, torch.dropout}

_LAYER = re.compile(r"layers[.\[_](\d+)")


def is_call(node: object, targets) -> bool:
    """Whether ``node`` is a call_function to one of ``targets`` (or a call_method of that name)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return any(getattr(t, "__name__", None) == node.target for t in targets)
    return False


def is_method(node: object, names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def is_view(node: fx.Node) -> bool:
    """A view-like op whose first argument is the tensor it reshapes."""
    if node.op == "call_method":
        return node.target in VIEW_METHODS
    if node.op == "call_function":
        if node.target in VIEW_FUNCTIONS:
            return True
        # tensor[...] slicing or None-indexing (repeat_kv's hs[:, :, None]), not a tuple index
        return node.target is operator.getitem and not isinstance(node.args[1], int)
    return False


def strip_views(node: object) -> object:
    """Follow view-like ops back to the tensor they view."""
    while isinstance(node, fx.Node) and is_view(node) and node.args:
        node = node.args[0]
    return node


def strip_casts(node: object) -> object:
    """Follow dtype casts and dropout back to their input."""
    while isinstance(node, fx.Node) and node.args and (is_method(node, CAST_METHODS) or is_call(node, DROPOUT_TARGETS)):
        node = node.args[0]
    return node


def example_value(node: object):
    """The FakeTensor (or SymInt) Dynamo recorded for ``node``, if any."""
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def symbolic_float(value: object) -> fx.Node | None:
    """``value`` when it is a node computing a Python float Dynamo traced as a symbol (``Sym(...)``), else None.

    Dynamo makes a float attribute such as an attention module's ``scaling`` symbolic when a code object it
    compiled sees another value of it: transformers' attention code is shared by every model of a class, so a
    second model with another head size in one process reaches it that way."""
    return value if isinstance(value, fx.Node) and isinstance(example_value(value), torch.SymFloat) else None


def sdpa_arguments(node: fx.Node) -> dict:
    """An SDPA call's arguments by name, defaults filled in."""
    return {**SDPA_DEFAULTS, **dict(zip(SDPA_PARAMETERS, node.args)), **node.kwargs}


def run_on_example_values(node: fx.Node, fake_mode):
    """What ``node`` computes from its inputs' example values, run under ``fake_mode``."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), example_value)
    with fake_mode:
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def with_example_value(node: fx.Node) -> fx.Node:
    """Give ``node`` (added by a pass) the fake value its target computes from its inputs' example values, so the
    passes after it, and the regions' compiler, see the layout it really returns. Left without one when an input
    has none."""
    values = [example_value(n) for n in node.all_input_nodes]
    # the inputs' own mode (Dynamo's), not the tracing context's: the backend's differs and they do not mix
    modes = {value.fake_mode for value in values if isinstance(value, FakeTensor)}
    if len(modes) == 1 and all(value is not None for value in values):
        node.meta["example_value"] = run_on_example_values(node, modes.pop())
    return node


def layer_index(node: fx.Node) -> int | None:
    """Decoder layer index from the node's module stack (``...layers.3.self_attn`` -> 3)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        match = _LAYER.search(str(path))
        if match:
            return int(match.group(1))
    return None


def module_path(node: fx.Node) -> str:
    """The innermost module path that produced ``node`` (for reports)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "?"
    return str(list(stack.values())[-1][0])


def prune_orphans(graph: fx.Graph, nodes) -> int:
    """Erase ``nodes`` (and then their inputs) once nothing uses them. Only pure calls are erased:
    an in-place method (``index_copy_``) or a placeholder is never touched."""
    erased = 0
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node.graph is not graph or node.users:
            continue
        if node.op not in ("call_function", "call_method") or str(node.target).endswith("_"):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        erased += 1
        stack.extend(inputs)
    return erased


def mark_cacheable(node: fx.Node) -> None:
    """Let AOTAutograd's on-disk cache take a graph in which ``node`` calls one of mmkv's own Python functions.

    The cache bypasses a graph that calls a function it cannot vouch for, and a bypass costs every new process
    the graph's whole tracing again. torch.fx.wrap's marks say the code is known; it is also in the key, since the
    backend tags every key it compiles with mmkv's source fingerprint (``mmkv_compile.sources``).
    """
    node.meta["is_wrapped"] = True
    node.meta["user_cache_hash"] = source_fingerprint()
