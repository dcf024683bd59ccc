"""Tiny random-weight models built from transformers config classes (no download), with matching inputs.

Used by ``mmkv demo``, the tests and the benchmarks. Sizes come from the arguments, never from a
model-specific constant: the number of image tokens follows from the vision config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TinyModel:
    """A model with the inputs of one prompt, and the facts the tests check against."""

    name: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    num_image_tokens: int
    image_token_id: int | None


def _text_kwargs(layers: int, hidden: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


def tiny_llama(
    attn: str = "sdpa",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    prompt_len: int = 24,
    batch: int = 1,
    seed: int = 0,
) -> TinyModel:
    """A text-only Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**_text_kwargs(layers, hidden, heads, kv_heads, vocab=128))
    model = _finish(LlamaForCausalLM._from_config(config, attn_implementation=attn))
    input_ids = torch.randint(3, 128, (batch, prompt_len))
    return TinyModel("llama", model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, 0, None)


def tiny_llava(
    attn: str = "sdpa",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    image_size: int = 32,
    patch: int = 8,
    text_before: int = 6,
    text_after: int = 10,
    batch: int = 1,
    seed: int = 0,
) -> TinyModel:
    """LLaVA: a CLIP vision tower, a projector and a Llama decoder; the image tokens sit inside the prompt."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vocab, image_token = 128, 100
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
    )
    text = LlamaConfig(**_text_kwargs(layers, hidden, heads, kv_heads, vocab))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token)
    model = _finish(LlavaForConditionalGeneration._from_config(config, attn_implementation=attn))
    num_image = (image_size // patch) ** 2  # "default" feature strategy drops the CLS token
    ids = torch.cat(
        [
            torch.randint(3, 90, (batch, text_before)),
            torch.full((batch, num_image), image_token),
            torch.randint(3, 90, (batch, text_after)),
        ],
        dim=1,
    )
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, image_size, image_size),
    }
    return TinyModel("llava", model, inputs, num_image * batch, image_token)


def tiny_qwen2_vl(
    attn: str = "sdpa",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    grid: tuple[int, int] = (4, 4),
    text_before: int = 5,
    text_after: int = 9,
    seed: int = 0,
) -> TinyModel:
    """Qwen2-VL (M-RoPE with rope_deltas): vision start/end markers around the merged image tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    vocab = 160
    image_token, video_token, vision_start, vision_end = 151, 152, 153, 154
    head_dim = hidden // heads
    text = dict(
        **_text_kwargs(layers, hidden, heads, kv_heads, vocab),
        rope_parameters={"rope_type": "default", "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]},
    )
    vision = dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, in_channels=3, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image_token,
        video_token_id=video_token,
        vision_start_token_id=vision_start,
        vision_end_token_id=vision_end,
    )
    model = _finish(Qwen2VLForConditionalGeneration._from_config(config, attn_implementation=attn))
    grid_h, grid_w = grid
    merge = vision["spatial_merge_size"]
    num_image = grid_h * grid_w // (merge * merge)
    ids = torch.cat(
        [
            torch.randint(3, 140, (1, text_before)),
            torch.tensor([[vision_start]]),
            torch.full((1, num_image), image_token),
            torch.tensor([[vision_end]]),
            torch.randint(3, 140, (1, text_after)),
        ],
        dim=1,
    )
    patch_dim = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(grid_h * grid_w, patch_dim),
        "image_grid_thw": torch.tensor([[1, grid_h, grid_w]]),
        "mm_token_type_ids": (ids == image_token).long(),
    }
    return TinyModel("qwen2_vl", model, inputs, num_image, image_token)


def tiny_gemma3_text(
    attn: str = "sdpa", layers: int = 4, prompt_len: int = 20, window: int = 6, seed: int = 0
) -> TinyModel:
    """Gemma3's decoder: sliding-window layers interleaved with full-attention layers."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    config = Gemma3TextConfig(
        **_text_kwargs(layers, 64, 4, 2, vocab=128), head_dim=16, sliding_window=window, layer_types=types
    )
    model = _finish(Gemma3ForCausalLM._from_config(config, attn_implementation=attn))
    input_ids = torch.randint(3, 128, (1, prompt_len))
    return TinyModel(
        "gemma3_text", model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, 0, None
    )


BUILDERS = {"llama": tiny_llama, "llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl, "gemma3_text": tiny_gemma3_text}
