"""Shared fixtures: tiny random models (no downloads) and a greedy generate helper."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from mmkv_compile.tiny import BUILDERS

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: two workers share the CI's two cores
    torch.set_num_threads(1)

MODELS = ("llama", "llava", "qwen2_vl")
ATTENTIONS = ("sdpa", "eager")


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo():
    """Each test module starts with empty Dynamo caches, so compiled graphs never leak between modules."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def quiet_known_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eos_token_id.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def build(name: str, attn: str = "sdpa", **kwargs):
    """A fresh tiny model (same seed, so the same weights, every time)."""
    return BUILDERS[name](attn=attn, **kwargs)


def generate(model, inputs: dict, steps: int = 8):
    """Greedy generate: (new token ids, per-step logits [B, steps, V], the cache)."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
    prompt_len = inputs["input_ids"].shape[1]
    return out.sequences[:, prompt_len:], torch.stack(out.logits, dim=1), out.past_key_values
