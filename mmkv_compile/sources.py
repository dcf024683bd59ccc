"""A fingerprint of mmkv's own source, for the compile caches' keys.

Inductor's and AOTAutograd's on-disk caches key a graph on its operators and inputs, not on the Python that
gives those operators meaning: a custom op's fake implementation (``ops.py``), or a plain function a pass
inserted (``masks.slot_attention_mask``). A cached artifact from other mmkv code would be reused unchanged, so
every key mmkv adds to includes this hash of all of its source files.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from pathlib import Path

PACKAGES = ("mmkv_compile", "mmkv_compile.passes", "mmkv_compile.kernels")


@functools.cache
def source_fingerprint() -> str:
    """A hash of every ``.py`` file of mmkv's packages (16 hex digits)."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for folder in importlib.import_module(package).__path__:
            for path in sorted(Path(folder).rglob("*.py")):
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
