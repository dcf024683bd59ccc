"""The ``mmkv`` backend name resolves in a fresh process through the ``torch_dynamo_backends`` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

BUILD = """
import sys, warnings, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 64, (1, 20))
"""


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )


def test_backend_name_works_without_importing_the_package():
    result = _python(
        BUILD
        + """
assert "mmkv_compile" not in sys.modules
compiled = torch.compile(model, backend="mmkv", options={"method": "snapkv", "budget": 0.25, "inductor": False, "window": 4})
from mmkv_compile import MMKVCache
cache = MMKVCache(config)
with torch.no_grad():
    compiled(input_ids=ids, past_key_values=cache, use_cache=True)
print("kept", cache.get_physical_length(), "of", cache.get_seq_length())
"""
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kept 5 of 20" in result.stdout


def test_backend_name_works_after_importing_the_package():
    result = _python(
        BUILD
        + """
import mmkv_compile
assert "mmkv" not in torch._dynamo.backends.registry._COMPILER_FNS  # nothing registered on import
compiled = torch.compile(model, backend="mmkv", options={"method": "h2o", "budget": 8, "inductor": False})
cache = mmkv_compile.MMKVCache(config)
with torch.no_grad():
    compiled(input_ids=ids, past_key_values=cache, use_cache=True)
print("kept", cache.get_physical_length())
"""
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kept 8" in result.stdout


def test_registering_on_import_as_well_would_break_a_fresh_process():
    """The failure mode the plain entry-point function avoids: registering the same name at import
    time too makes the entry-point lookup fail with "duplicate name"."""
    result = _python(
        BUILD
        + """
from torch._dynamo.backends import registry
registry._lazy_import()
entry_point = registry._BACKENDS["mmkv"]

class RegistersOnImport:  # what a decorated entry-point target does when its module is imported
    def load(self):
        function = entry_point.load()
        registry.register_backend(function, name="mmkv")
        return function

registry._BACKENDS["mmkv"] = RegistersOnImport()
try:
    torch.compile(model, backend="mmkv")
except AssertionError as exc:
    print("error:", exc)
"""
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "duplicate name: mmkv" in result.stdout
