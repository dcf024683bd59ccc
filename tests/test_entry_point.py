"""The ``mmkv`` backend name resolves in a fresh process through the ``torch_dynamo_backends`` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BUILD = """
import sys, warnings, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 64, (1, 20))
"""


def _python(code: str, cwd: Path | None = None, extra_path: str = "") -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh process; from ``cwd`` when given, with ``extra_path`` as its PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON") and k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
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


CHECKOUT = Path(__file__).resolve().parents[1]


def test_the_checkout_kernels_folder_hands_the_name_kernels_to_the_package_that_owns_it(tmp_path):
    """Run from a checkout, ``import kernels`` finds mmkv's ``kernels/`` folder first; it must reach the package
    of that name instead (transformers 5.25 imports Hugging Face's ``kernels`` at start-up)."""
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("WHO = 'the package named kernels'\n")
    result = _python(
        """
        from kernels import WHO
        import mmkv_compile.kernels.reference
        print(WHO)
        """,
        cwd=CHECKOUT,
        extra_path=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "the package named kernels"


def test_transformers_starts_from_a_checkout():
    """Whatever ``kernels`` is installed (Hugging Face's with transformers 5.25, none before), transformers and
    mmkv import from the repository root, and ``kernels`` is mmkv's folder only where no package owns the name."""
    result = _python(
        """
        import importlib.metadata, transformers.activations, kernels, mmkv_compile
        try:
            installed = importlib.metadata.version("kernels")
        except importlib.metadata.PackageNotFoundError:
            installed = None
        print(installed, kernels.__file__)
        """,
        cwd=CHECKOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    installed, where = result.stdout.split()
    assert (installed == "None") == where.startswith(str(CHECKOUT / "kernels")), result.stdout
