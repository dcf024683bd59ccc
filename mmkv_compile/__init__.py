"""mmkv-compile: KV-cache compression for multimodal LLMs, applied by a torch.compile backend.

import mmkv_compile
mmkv_compile.compile(model, method="snapkv", budget=0.25)   # then model.generate(...)
torch.compile(model, backend="mmkv", options={"method": "snapkv", "budget": 0.25})
"""

from mmkv_compile.api import apply_eagerly, compile, compiled_reports, explain, uncompile
from mmkv_compile.backend import mmkv_backend
from mmkv_compile.cache import MMKVCache, MMKVLayer
from mmkv_compile.labels import Modality
from mmkv_compile.methods import METHODS
from mmkv_compile.reports import ExplainReport, MMKVWarning


def methods() -> dict[str, dict]:
    """Every method: description, paper and parameters with their defaults."""
    return {
        name: {"description": cls.description, "paper": cls.paper, "parameters": cls.parameters()}
        for name, cls in METHODS.items()
    }


__all__ = [
    "ExplainReport",
    "MMKVCache",
    "MMKVLayer",
    "MMKVWarning",
    "Modality",
    "apply_eagerly",
    "compile",
    "compiled_reports",
    "explain",
    "methods",
    "mmkv_backend",
    "uncompile",
]
__version__ = "0.1.0"
