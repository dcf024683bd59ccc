"""What the backend tells the user: a report per captured graph, the explain report, and the one warning per
reason when something is not compressed."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from mmkv_compile.regions import RegionStats

PREFILL, DECODE, NO_CACHE = "prefill", "decode", "no mmkv cache"  # a graph's phase


class MMKVWarning(UserWarning):
    """A graph, or part of it, was compiled or run without compression; the message says why."""


@dataclass
class SiteReport:
    """One attention site as ``explain`` reports it."""

    layer: int | None
    kind: str  # "sdpa" or "eager"
    cache: str  # "mmkv", "transformers_layer", "static_cache", "none" or "unknown"
    gqa_groups: int
    decision: str  # "compress", "append", "keep" or "skip"
    rewritten: bool
    evicts: bool
    mask_rebuilt: bool
    reason: str
    module: str


@dataclass
class GraphReport:
    """One captured graph: its phase, its sites, what each pass matched, and any warning it gave."""

    index: int
    phase: str
    sites: list[SiteReport] = field(default_factory=list)
    passes: dict[str, int] = field(default_factory=dict)
    fallback: str = ""
    warnings: list[str] = field(default_factory=list)
    regions: RegionStats | None = None  # how Inductor compiled it, when by regions
    whole_because: str = ""  # why Inductor compiled it whole though it has repeated layers (same code, slower)

    def compresses(self) -> bool:
        """Whether this graph evicts from the cache at any layer."""
        return any(site.evicts for site in self.sites)


@dataclass
class ExplainReport:
    """Every graph captured while generating from a prompt, with each attention site."""

    method: str
    budget: float | int
    graphs: list[GraphReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def sites(self) -> list[tuple[str, SiteReport]]:
        """All site reports, with their graph's phase."""
        return [(g.phase, s) for g in self.graphs for s in g.sites]

    def compresses(self, phase: str = PREFILL) -> bool:
        """Whether a graph of ``phase`` evicts from the cache."""
        return any(g.compresses() for g in self.graphs if g.phase == phase)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"mmkv explain: method={self.method} budget={self.budget}, {len(self.graphs)} graph(s)"]
        for g in self.graphs:
            lines.append(
                f"graph {g.index} [{g.phase}] passes: {g.passes}" + (f" FALLBACK: {g.fallback}" if g.fallback else "")
            )
            for s in g.sites:
                layer = "-" if s.layer is None else s.layer
                what = {(True, True): "evict+mask", (True, False): "evict", (False, True): "mask"}.get(
                    (s.evicts, s.mask_rebuilt), "no"
                )
                why = f"  ({s.reason})" if s.reason else ""
                lines.append(
                    f"  layer {layer:>3}  {s.kind:<5} cache={s.cache:<18} gqa={s.gqa_groups}  rewritten={what}{why}"
                )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class Warner:
    """Warns once per message for one compiled model (its prefill and decode graphs usually share a reason)."""

    def __init__(self) -> None:
        self.given: list[str] = []

    def warn(self, message: str, stacklevel: int = 3) -> None:
        if message not in self.given:
            self.given.append(message)
            warnings.warn(message, MMKVWarning, stacklevel=stacklevel)


__all__ = ["DECODE", "NO_CACHE", "PREFILL", "ExplainReport", "GraphReport", "MMKVWarning", "SiteReport", "Warner"]
