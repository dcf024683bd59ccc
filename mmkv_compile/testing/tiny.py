"""Tiny random-weight models built from transformers config classes (no download), with matching inputs.

Used by ``mmkv demo``, the tests and the benchmarks. Sizes come from the arguments, never from a
model-specific constant: the number of image tokens follows from the vision config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmkv_compile.compat import forward_takes


@dataclass
class TinyModel:
    """A model with the inputs of one prompt, and the facts the tests check against."""

    name: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    num_image_tokens: int
    image_token_id: int | None


def text_config_kwargs(layers: int, hidden: int, heads: int, kv_heads: int, vocab: int) -> dict:
    """The decoder settings every tiny model shares (token ids 0-2 are pad, bos, eos)."""
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


def finish_model(model: torch.nn.Module) -> torch.nn.Module:
    """Evaluation mode, and a pad token so ``generate`` does not warn."""
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
    config = LlamaConfig(**text_config_kwargs(layers, hidden, heads, kv_heads, vocab=128))
    model = finish_model(LlamaForCausalLM._from_config(config, attn_implementation=attn))
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
    images: int = 1,
    text_between: int = 0,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    vocab: int = 128,
) -> TinyModel:
    """LLaVA: a CLIP vision tower, a projector and a Llama decoder; the prompt is ``text_before`` text tokens,
    then ``images`` images each followed by ``text_between`` text tokens, then ``text_after`` text tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    image_token, text_high = vocab - 28, vocab - 38  # ids 3..text_high are text, image_token is reserved
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=2 if vision_hidden <= 32 else 4,
        image_size=image_size,
        patch_size=patch,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(**text_config_kwargs(layers, hidden, heads, kv_heads, vocab))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token)
    model = finish_model(LlavaForConditionalGeneration._from_config(config, attn_implementation=attn))
    num_image = (image_size // patch) ** 2  # "default" feature strategy drops the CLS token
    pieces = [torch.randint(3, text_high, (batch, text_before))]
    for _ in range(images):
        pieces += [torch.full((batch, num_image), image_token), torch.randint(3, text_high, (batch, text_between))]
    pieces.append(torch.randint(3, text_high, (batch, text_after)))
    ids = torch.cat(pieces, dim=1)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch * images, 3, image_size, image_size),
    }
    return TinyModel("llava", model, inputs, num_image * images * batch, image_token)


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
        **text_config_kwargs(layers, hidden, heads, kv_heads, vocab),
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
    model = finish_model(Qwen2VLForConditionalGeneration._from_config(config, attn_implementation=attn))
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
    }
    if forward_takes(model, "mm_token_type_ids"):  # (transformers 5.2: no)
        inputs["mm_token_type_ids"] = (ids == image_token).long()
    return TinyModel("qwen2_vl", model, inputs, num_image, image_token)


def tiny_gemma3_text(
    attn: str = "sdpa", layers: int = 4, prompt_len: int = 20, window: int = 6, seed: int = 0
) -> TinyModel:
    """Gemma3's decoder: sliding-window layers interleaved with full-attention layers."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    config = Gemma3TextConfig(
        **text_config_kwargs(layers, 64, 4, 2, vocab=128), head_dim=16, sliding_window=window, layer_types=types
    )
    model = finish_model(Gemma3ForCausalLM._from_config(config, attn_implementation=attn))
    input_ids = torch.randint(3, 128, (1, prompt_len))
    return TinyModel(
        "gemma3_text", model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, 0, None
    )


def tiny_decoder(
    config_class: str,
    model_class: str,
    attn: str = "sdpa",
    layers: int = 2,
    prompt_len: int = 24,
    seed: int = 0,
    **config,
) -> TinyModel:
    """A text-only decoder of any transformers family, by its config and model class names, with ``config``'s
    own settings (a real model's ``sliding_window``, say)."""
    import transformers

    torch.manual_seed(seed)
    settings = {**text_config_kwargs(layers, 64, 4, 2, vocab=128), **config}
    model_config = getattr(transformers, config_class)(**settings)
    model = finish_model(getattr(transformers, model_class)._from_config(model_config, attn_implementation=attn))
    input_ids = torch.randint(3, 128, (1, prompt_len))
    name = config_class.removesuffix("Config").lower()
    return TinyModel(name, model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, 0, None)


def tiny_phi3(attn: str = "sdpa", **kwargs) -> TinyModel:
    """Phi-3's decoder with Phi-3-mini's real sliding window (2047): every layer is a sliding layer."""
    return tiny_decoder("Phi3Config", "Phi3ForCausalLM", attn, **{"sliding_window": 2047, **kwargs})


def tiny_mistral(attn: str = "sdpa", **kwargs) -> TinyModel:
    """Mistral's decoder with Mistral-7B-v0.1's real sliding window (4096)."""
    return tiny_decoder("MistralConfig", "MistralForCausalLM", attn, **{"sliding_window": 4096, **kwargs})


BUILDERS = {
    "llama": tiny_llama,
    "llava": tiny_llava,
    "qwen2_vl": tiny_qwen2_vl,
    "gemma3_text": tiny_gemma3_text,
    "phi3": tiny_phi3,
    "mistral": tiny_mistral,
}
