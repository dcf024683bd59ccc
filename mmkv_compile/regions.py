"""Compile a rewritten graph region by region, each repeated region once.

A decoder of N layers is captured as one graph holding N copies of the same layer code, and Inductor's time grows
with the graph (AOTAutograd's metadata pass, lowering, scheduling, code generation): compiled whole, SmolLM2's 30
layers took minutes on this project's CPU. Here the graph is cut into regions, runs of nodes that come from one
item of a repeated module list (``model.layers.3``) or from the code between them, with each of mmkv's own
operators in a region of its own (opaque to Inductor anyway, and a layer's constants in their arguments would
make the layers differ). A region is compiled once for all regions with the same code over inputs of the same
kinds and shapes, and its compiled function is called for each of them (vLLM's piecewise compilation, cut at
layers instead of attention).

Symbolic sizes match up to a renaming: each layer's cache buffers have lengths of their own symbols. A region
reuses another's compiled function only when the renaming maps every guard Dynamo holds on the first region's
symbols to one it holds on its own, and every guard Inductor adds while compiling the first holds for it too (it
is then added for it); otherwise it is compiled on its own. Whatever cannot be cut this way (a value between
regions that is neither a tensor nor a size) makes :func:`compile_regions` return None: the caller compiles the
graph whole.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings
from torch.fx.passes.split_module import split_module

from mmkv_compile.passes.graph_utils import example_value, run_on_example_values

CompileFn = Callable[[fx.GraphModule, list], Callable]

# An item of a module list in a module path: "model.layers.3", "L['self'].model.layers[3]".
_LIST_ITEM = re.compile(r"^(.*?)(?:\.|\[)(\d+)\]?$")


def _list_item(node: fx.Node) -> tuple[str, int] | None:
    """(list path, index) of the outermost module-list item ``node`` was traced in, if any."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        match = _LIST_ITEM.match(str(path))
        if match:
            return match.group(1), int(match.group(2))
    return None


def _is_mmkv_op(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith("mmkv.")


def assign_regions(gm: fx.GraphModule) -> tuple[dict[fx.Node, int], set[int]]:
    """Each computing node's region (consecutive nodes of one layer, or of the code between layers, share one;
    each mmkv operator has its own), and the regions that hold an mmkv operator."""
    regions: dict[fx.Node, int] = {}
    operators: set[int] = set()
    region, key = -1, object()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        source = node.args[0] if node.target is operator.getitem and isinstance(node.args[0], fx.Node) else None
        if source is not None and source in regions:  # a tuple's item stays with the tuple
            regions[node] = regions[source]
            continue
        if _is_mmkv_op(node):
            region, key = region + 1, object()
            operators.add(region)
        else:
            item = _list_item(node) if node.meta.get("nn_module_stack") else key  # nodes the passes added
            if item != key or region in operators:
                region, key = region + 1, item
        regions[node] = region
    return regions, operators


@dataclass
class RegionSignature:
    """A region's code and input kinds, with its symbols renamed in order of appearance."""

    text: str
    symbols: list[sympy.Symbol] = field(default_factory=list)


class _Renamer:
    def __init__(self):
        self.symbols: list[sympy.Symbol] = []

    def expr(self, value) -> str:
        expr = value.node.expr if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool) else value
        if not isinstance(expr, sympy.Basic):
            return repr(expr)
        for symbol in sorted(expr.free_symbols, key=str):
            if symbol not in self.symbols:
                self.symbols.append(symbol)
        names = {s: sympy.Symbol(f"c{self.symbols.index(s)}", integer=True) for s in expr.free_symbols}
        return str(expr.xreplace(names))


def _describe(value, renamer: _Renamer) -> str:
    if isinstance(value, torch.Tensor):
        shape = ",".join(renamer.expr(s) for s in value.shape)
        stride = ",".join(renamer.expr(s) for s in value.stride())
        offset = renamer.expr(value.storage_offset())
        return f"T({value.dtype},{value.device},[{shape}],[{stride}],{offset},{value.requires_grad})"
    if isinstance(value, torch.SymInt | int):
        return f"I({renamer.expr(value)})"
    raise TypeError(f"a region input of type {type(value).__name__}")


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', None) or getattr(target, '__name__', repr(target))}"


def signature(region: fx.GraphModule, inputs: Sequence) -> RegionSignature:
    """What must match for two regions to share one compiled function."""
    renamer = _Renamer()
    index: dict[fx.Node, str] = {}
    lines = []
    for i, node in enumerate(region.graph.nodes):
        index[node] = f"%{i}"
        if node.op == "get_attr":
            raise TypeError("a region reads a module attribute")
        if node.op == "placeholder":  # named after the value it receives
            lines.append("placeholder")
            continue
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: index[n])
        lines.append(f"{node.op} {_target_name(node)} {args!r}")
    placeholders = [n for n in region.graph.nodes if n.op == "placeholder"]
    lines += [_describe(value, renamer) for value in inputs[: len(placeholders)]]
    return RegionSignature("\n".join(lines), renamer.symbols)


def _hint(value) -> int | None:
    return value.node.hint if isinstance(value, torch.SymInt) else value


def dense_order(value) -> tuple[int, ...] | None:
    """The dimensions of a fake tensor from outermost to innermost, when it is dense in that order (its sizes'
    hints say so); None for anything else (a view into a larger tensor, unknown sizes)."""
    if not isinstance(value, torch.Tensor):
        return None
    sizes, strides = [_hint(x) for x in value.shape], [_hint(x) for x in value.stride()]
    if None in sizes or None in strides:
        return None
    order = tuple(sorted(range(len(sizes)), key=lambda d: (-strides[d], d)))
    return order if dense_strides(sizes, order) == tuple(strides) else None


def dense_strides(sizes, order: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of a dense tensor of ``sizes`` laid out in ``order`` (outermost first)."""
    strides, step = [0] * len(sizes), 1
    for dim in reversed(order):
        strides[dim] = step
        step *= max(int(sizes[dim]), 1)
    return tuple(strides)


class CompiledRegion(torch.nn.Module):
    """A region's compiled function as a submodule of the split graph.

    Inductor may return a dense output in another layout than the captured code's (seen: ``torch.cat`` on CPU),
    and the region that reads it checks its strides; each output whose captured value is dense is laid out in
    that value's order before it leaves (a copy only when the layouts differ).
    """

    def __init__(self, compiled: Callable, layouts: list[tuple[int, ...] | None]):
        super().__init__()
        self.compiled = compiled
        self.layouts = layouts

    def forward(self, *args):
        outputs = self.compiled(*args)
        return tuple(_laid_out(out, order) for out, order in zip(outputs, self.layouts, strict=True))


def _laid_out(tensor, order: tuple[int, ...] | None):
    if order is None or not isinstance(tensor, torch.Tensor):
        return tensor
    strides = dense_strides(tensor.shape, order)
    if tensor.stride() == strides:
        return tensor
    return torch.empty_strided(tensor.shape, strides, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def _fill_example_values(nodes, fake_mode) -> None:
    """Give ``nodes``, where the passes added them, a fake value like the ones Dynamo recorded for the others,
    running them (and any added node they read) on their inputs' fake values. Only values that cross a region
    boundary are needed: running every added node would cost seconds (a cache write's symbolic bounds)."""
    pending = [n for n in nodes if "example_value" not in n.meta]
    while pending:
        node = pending[-1]
        missing = [n for n in node.all_input_nodes if "example_value" not in n.meta]
        if missing:
            pending += missing
            continue
        pending.pop()
        if "example_value" in node.meta:
            continue
        value = node.meta["example_value"] = run_on_example_values(node, fake_mode)
        # sizes the op's output has that nothing knows in advance (per-layer budgets): bound to this node
        bindings = compute_unbacked_bindings(fake_mode.shape_env, value)
        if bindings:
            node.meta["unbacked_bindings"] = bindings


def _crossing(assignment: dict[fx.Node, int]) -> list[fx.Node]:
    """Nodes whose value leaves their region (read by another region, or returned by the graph)."""
    return [
        node for node, region in assignment.items()
        if any(user.op == "output" or assignment.get(user, region) != region for user in node.users)
    ]  # fmt: skip


@dataclass
class RegionStats:
    """How a graph was compiled: regions, how many were compiled and how many reused another's function."""

    regions: int = 0
    compiled: int = 0
    reused: int = 0
    operators: int = 0


def compile_regions(gm: fx.GraphModule, compile_fn: CompileFn) -> tuple[fx.GraphModule, RegionStats] | None:
    """``gm`` (a Dynamo graph: its nodes hold Dynamo's fake values) split into regions, each compiled by
    ``compile_fn(region, example_inputs)`` once per signature (see the module docstring). None when the graph has
    no repeated module list."""
    assignment, operators = assign_regions(gm)
    if not any(_list_item(n) for n in assignment if n.meta.get("nn_module_stack")):
        return None
    # Dynamo's fake mode, whose values the nodes hold; Dynamo hands the backend another one over the same shape
    # environment, and compile_fx takes its mode from the tracing context: each region gets one with Dynamo's.
    fakes = [v for n in gm.graph.nodes if isinstance(v := example_value(n), FakeTensor)]
    fake_mode = fakes[0].fake_mode if fakes else None
    if fake_mode is None or fake_mode.shape_env is None:
        return None
    _fill_example_values(_crossing(assignment), fake_mode)
    split = split_module(gm, None, lambda node: assignment[node], keep_original_order=True, tuple_return=True)
    compiler = _RegionCompiler(fake_mode, compile_fn)
    for node in split.graph.nodes:
        if node.op != "call_module":
            continue
        compiler.stats.regions += 1
        if int(node.target.rsplit("_", 1)[1]) in operators:  # mmkv's operators run as they are
            compiler.stats.operators += 1
            continue
        region: fx.GraphModule = getattr(split, node.target)
        outputs = next(n for n in region.graph.nodes if n.op == "output").args[0]
        layouts = [dense_order(example_value(out)) if isinstance(out, fx.Node) else None for out in outputs]
        setattr(split, node.target, CompiledRegion(compiler.compile(region), layouts))
    split.recompile()
    return split, compiler.stats


@dataclass
class _Compiled:
    signature: RegionSignature
    guards_before: set  # the shape environment's guards on its symbols before it was compiled (renamed)
    added: list  # the guards compiling it added, over its symbols
    function: Callable


class _RegionCompiler:
    """Compiles regions, reusing a compiled function where that is sound (see the module docstring)."""

    def __init__(self, fake_mode, compile_fn: CompileFn):
        self.fake_mode, self.shape_env, self.compile_fn = fake_mode, fake_mode.shape_env, compile_fn
        self.done: dict[str, list[_Compiled]] = {}
        self.stats = RegionStats()
        self._indexed_guards = -1
        self._guards_by_symbol: dict[sympy.Symbol, set] = {}

    def compile(self, region: fx.GraphModule) -> Callable:
        inputs = [example_value(p) for p in region.graph.nodes if p.op == "placeholder"]
        sig = signature(region, inputs)
        for candidate in self.done.get(sig.text, []):
            if self._sound(candidate, sig):
                self.stats.reused += 1
                return candidate.function
        before = len(self.shape_env.guards)
        guards = self._guards_on(sig.symbols)
        with torch._guards.tracing(torch._guards.TracingContext(self.fake_mode)):
            function = self.compile_fn(region, inputs)
        added = [g.expr for g in self.shape_env.guards[before:]]
        self.done.setdefault(sig.text, []).append(_Compiled(sig, guards, added, function))
        self.stats.compiled += 1
        return function

    def _sound(self, candidate: _Compiled, sig: RegionSignature) -> bool:
        """Whether ``candidate``'s function computes a region with signature ``sig``: the same guards hold on its
        symbols, and what compiling the candidate assumed holds for it too (then it is guarded, as there)."""
        if (
            len(candidate.signature.symbols) != len(sig.symbols)
            or self._guards_on(sig.symbols) != candidate.guards_before
        ):
            return False
        rename = dict(zip(candidate.signature.symbols, sig.symbols, strict=True))
        return all(self._holds(expr.xreplace(rename)) for expr in candidate.added)

    def _guards_on(self, symbols: list[sympy.Symbol]) -> set:
        """The guards that mention any of ``symbols`` (after the shape environment's replacements), with those
        renamed to c0, c1, ..."""
        if len(self.shape_env.guards) != self._indexed_guards:
            self._guards_by_symbol = {}
            for guard in self.shape_env.guards:
                expr = self.shape_env.replace(guard.expr)
                for symbol in expr.free_symbols:
                    self._guards_by_symbol.setdefault(symbol, set()).add(expr)
            self._indexed_guards = len(self.shape_env.guards)
        names = {s: sympy.Symbol(f"c{i}", integer=True) for i, s in enumerate(symbols)}
        exprs = set().union(*(self._guards_by_symbol.get(s, set()) for s in symbols))
        return {expr.xreplace(names) for expr in exprs}

    def _holds(self, expr) -> bool:
        try:
            return bool(self.shape_env.evaluate_expr(expr))
        except Exception:  # noqa: BLE001 - what cannot be decided is not assumed: the region is compiled itself
            return False


__all__ = ["CompiledRegion", "RegionStats", "assign_regions", "compile_regions", "signature"]
