"""Method presets. Each is a small dataclass whose fields are its parameters (see :func:`methods`)."""

from __future__ import annotations

from mmkv_compile.methods.adakv import AdaKV
from mmkv_compile.methods.base import Method
from mmkv_compile.methods.full import Full
from mmkv_compile.methods.h2o import H2O
from mmkv_compile.methods.hae import HAE
from mmkv_compile.methods.look_m import LookM
from mmkv_compile.methods.madakv import MadaKV
from mmkv_compile.methods.meda import MEDA
from mmkv_compile.methods.pyramidkv import PyramidKV
from mmkv_compile.methods.retentivekv import RetentiveKV
from mmkv_compile.methods.snapkv import SnapKV
from mmkv_compile.methods.streaming_llm import StreamingLLM
from mmkv_compile.methods.text_prior import TextPrior
from mmkv_compile.methods.tova import TOVA
from mmkv_compile.methods.vl_cache import VLCache

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        Full,
        StreamingLLM,
        SnapKV,
        H2O,
        TextPrior,
        PyramidKV,
        AdaKV,
        TOVA,
        LookM,
        MEDA,
        VLCache,
        MadaKV,
        RetentiveKV,
        HAE,
    )
}


def build_method(name: str, **params) -> Method:
    """Instantiate method ``name`` with ``params``; unknown names or parameters raise ValueError."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    allowed = cls.parameters()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        names = ", ".join(allowed) or "none"
        raise ValueError(f"{name}: unknown parameter(s) {', '.join(unknown)}; its parameters are: {names}")
    return cls(**params, explicit=frozenset(params))


def compresses(name: str) -> bool:
    """Whether method ``name`` can evict anything at all (``full`` cannot: it has no budget to vary)."""
    return build_method(name).policy(0.5).compress


__all__ = ["METHODS", "Method", "build_method", "compresses"]
