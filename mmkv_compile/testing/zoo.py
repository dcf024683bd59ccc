"""The model zoo: one tiny random-weight builder per transformers family, and the coverage matrix.

Every builder makes a model from transformers' own config classes (2 decoder layers, hidden 32-64, a
one-layer vision tower, a handful of image tokens; no download) and a prompt for it. The number of
image/video placeholders in a prompt is whatever the model's own ``get_image_features`` /
``get_video_features`` produce for the pixel inputs, so no builder hard-codes a token count.

``python -m mmkv_compile.testing.zoo --out docs/models.md`` runs every family through the matrix (attention
sdpa/eager x cache DynamicCache/StaticCache x prefill/decode) and writes the coverage table from what
the run measured. The library itself has no per-family code: these builders only make inputs.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mmkv_compile.compat import forward_takes, output_cache
from mmkv_compile.labels import Modality, modality_token_ids
from mmkv_compile.testing.tiny import finish_model, text_config_kwargs

VOCAB = 128
TEXT_LOW, TEXT_HIGH = 3, 90  # random text tokens; special tokens live in [100, 128)
IMAGE, VIDEO, MARK_A, MARK_B, MARK_C, MARK_D = 100, 101, 102, 103, 104, 105


@dataclass
class ZooModel:
    """A tiny model, one prompt for it, and the placeholder counts its vision code produced."""

    family: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    placeholders: dict[Modality, int] = field(default_factory=dict)

    def count_in_prompt(self) -> dict[Modality, int]:
        """Placeholder tokens per modality in ``input_ids``, read through the config's token ids."""
        ids = self.inputs["input_ids"]
        counts = {m: 0 for m in (Modality.IMAGE, Modality.VIDEO)}
        for token, modality in modality_token_ids(self.model.config).items():
            if modality in counts:
                counts[modality] += int((ids == token).sum())
        return counts


@dataclass(frozen=True)
class Family:
    """One transformers family: its module, a builder ``attn -> ZooModel``, and what it exercises."""

    name: str
    module: str  # transformers.models.<module>; a family the installed transformers lacks is skipped
    build: Callable[[str], ZooModel]
    kind: str  # "text" or "multimodal"
    exercises: str = ""

    def available(self) -> bool:
        try:
            importlib.import_module(f"transformers.models.{self.module}")
        except ImportError:
            return False
        return True


# -- helpers -------------------------------------------------------------------------------------------


def _text(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, **extra) -> dict:
    return {**text_config_kwargs(layers, hidden, heads, kv_heads, VOCAB), **extra}


def _prompt(*parts) -> torch.Tensor:
    """``[1, L]`` ids from parts: an int n is n random text tokens, a pair (token, n) is n copies of token."""
    pieces = []
    for part in parts:
        if isinstance(part, int):
            pieces.append(torch.randint(TEXT_LOW, TEXT_HIGH, (part,)))
        else:
            pieces.append(torch.full((part[1],), part[0]))
    return torch.cat(pieces).unsqueeze(0)


def _rows(features) -> int:
    """Number of feature vectors (tokens) in a vision output: a tensor, a list of tensors, or a ModelOutput."""
    if hasattr(features, "pooler_output") and features.pooler_output is not None:
        features = features.pooler_output
    elif hasattr(features, "last_hidden_state"):
        features = features.last_hidden_state
    if isinstance(features, torch.Tensor):
        return features.numel() // features.shape[-1]
    return sum(_rows(f) for f in features)


def _feature_count(model, modality: str, **kwargs) -> int:
    """How many placeholder tokens the model's own vision code fills for these pixel inputs."""
    fn = getattr(model.base_model, f"get_{modality}_features")
    with torch.no_grad():
        return _rows(fn(**kwargs))


def _make(cls, config, attn: str):
    return finish_model(cls._from_config(config, attn_implementation=attn))


def _text_only(family: str, config_cls: str, model_cls: str, prompt_len: int = 24, **config_kwargs):
    def build(attn: str = "sdpa") -> ZooModel:
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**_text(**config_kwargs))
        model = _make(getattr(transformers, model_cls), config, attn)
        ids = _prompt(prompt_len)
        return ZooModel(family, model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    return build


def _inputs(ids: torch.Tensor, **extra) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}


def _with_type_ids(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``mm_token_type_ids`` (text 0, image 1, video 2), as the processor returns them, where the model's
    forward takes them (M-RoPE models require them from transformers 5.24; 5.2 has no such argument)."""
    if forward_takes(model, "mm_token_type_ids"):
        ids = inputs["input_ids"]
        inputs["mm_token_type_ids"] = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    return inputs


def _clip(image_size: int = 16, patch: int = 4, **extra):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=image_size, patch_size=patch, projection_dim=32, **extra)  # fmt: skip


def _siglip(image_size: int = 16, patch: int = 4, **extra):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, **extra)  # fmt: skip


# -- text families --------------------------------------------------------------------------------------

build_llama = _text_only("llama", "LlamaConfig", "LlamaForCausalLM")
build_qwen2 = _text_only("qwen2", "Qwen2Config", "Qwen2ForCausalLM")
build_qwen3 = _text_only("qwen3", "Qwen3Config", "Qwen3ForCausalLM", head_dim=16)
# real sliding windows: Mistral-7B-v0.1's 4096 and Phi-3-mini's 2047 (every layer a sliding layer)
build_mistral = _text_only("mistral", "MistralConfig", "MistralForCausalLM", sliding_window=4096)
build_phi3 = _text_only("phi3", "Phi3Config", "Phi3ForCausalLM", sliding_window=2047)
build_gemma2 = _text_only(
    "gemma2", "Gemma2Config", "Gemma2ForCausalLM", head_dim=16, sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
)  # fmt: skip
build_gemma3_text = _text_only(
    "gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
)  # fmt: skip


# -- multimodal families --------------------------------------------------------------------------------


def build_llava(attn: str = "sdpa") -> ZooModel:
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(vision_config=_clip(), text_config=LlamaConfig(**_text()), image_token_index=IMAGE)
    model = _make(LlavaForConditionalGeneration, config, attn)
    pixels = torch.randn(1, 3, 16, 16)
    n = _feature_count(model, "image", pixel_values=pixels)
    ids = _prompt(5, (IMAGE, n), 8)
    return ZooModel("llava", model, _inputs(ids, pixel_values=pixels), {Modality.IMAGE: n})


def build_llava_next(attn: str = "sdpa") -> ZooModel:
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaNextConfig(vision_config=_clip(), text_config=LlamaConfig(**_text()), image_token_index=IMAGE,
                             image_grid_pinpoints=[[16, 16]])  # fmt: skip
    model = _make(LlavaNextForConditionalGeneration, config, attn)
    pixels, sizes = torch.randn(1, 2, 3, 16, 16), torch.tensor([[16, 16]])  # base view + one anyres tile
    n = _feature_count(model, "image", pixel_values=pixels, image_sizes=sizes)
    ids = _prompt(5, (IMAGE, n), 8)
    return ZooModel("llava_next", model, _inputs(ids, pixel_values=pixels, image_sizes=sizes), {Modality.IMAGE: n})


def build_llava_onevision(attn: str = "sdpa") -> ZooModel:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config

    torch.manual_seed(0)
    config = LlavaOnevisionConfig(vision_config=_siglip(), text_config=Qwen2Config(**_text()),
                                  image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=[[16, 16]])  # fmt: skip
    model = _make(LlavaOnevisionForConditionalGeneration, config, attn)
    pixels, sizes = torch.randn(1, 2, 3, 16, 16), torch.tensor([[16, 16]])
    video = torch.randn(1, 2, 3, 16, 16)  # two frames
    n_img = _feature_count(model, "image", pixel_values=pixels, image_sizes=sizes)
    n_vid = _feature_count(model, "video", pixel_values_videos=video)
    ids = _prompt(4, (IMAGE, n_img), 3, (VIDEO, n_vid), 6)
    inputs = _inputs(ids, pixel_values=pixels, image_sizes=sizes, pixel_values_videos=video)
    return ZooModel("llava_onevision", model, inputs, {Modality.IMAGE: n_img, Modality.VIDEO: n_vid})


def build_llava_next_video(attn: str = "sdpa") -> ZooModel:
    from transformers import LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaNextVideoConfig(vision_config=_clip(), text_config=LlamaConfig(**_text()), image_token_index=IMAGE,
                                  video_token_index=VIDEO, image_grid_pinpoints=[[16, 16]])  # fmt: skip
    model = _make(LlavaNextVideoForConditionalGeneration, config, attn)
    video = torch.randn(1, 2, 3, 16, 16)
    n_vid = _feature_count(model, "video", pixel_values_videos=video)
    ids = _prompt(5, (VIDEO, n_vid), 8)
    return ZooModel("llava_next_video", model, _inputs(ids, pixel_values_videos=video), {Modality.VIDEO: n_vid})


def _qwen_vl(family: str, config_cls: str, model_cls: str, vision: dict, text_extra: dict, attn: str,
             frames_apart: bool = False) -> ZooModel:  # fmt: skip
    """A Qwen-VL prompt with one image and one 2-frame video; ``frames_apart``: each video frame in its own
    vision start/end block after a timestamp, as Qwen3-VL's processor writes them."""
    import transformers

    torch.manual_seed(0)
    head_dim = 16
    text = _text(head_dim=head_dim, **text_extra)
    text.setdefault("rope_parameters", {"rope_type": "default", "mrope_section": [4, 2, 2]})
    config = getattr(transformers, config_cls)(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                               video_token_id=VIDEO, vision_start_token_id=MARK_A,
                                               vision_end_token_id=MARK_B)  # fmt: skip
    model = _make(getattr(transformers, model_cls), config, attn)
    patch_dim = 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    image_grid, video_grid = torch.tensor([[1, 4, 4]]), torch.tensor([[2, 4, 4]])
    pixels = torch.randn(int(image_grid.prod()), patch_dim)
    video = torch.randn(int(video_grid.prod()), patch_dim)
    n_img = _feature_count(model, "image", pixel_values=pixels, image_grid_thw=image_grid)
    n_vid = _feature_count(model, "video", pixel_values_videos=video, video_grid_thw=video_grid)
    frames = int(video_grid[0, 0]) if frames_apart else 1
    timestamp = 2 if frames_apart else 0  # text tokens before each frame ("<0.5 seconds>")
    video_blocks = [(timestamp, (MARK_A, 1), (VIDEO, n_vid // frames), (MARK_B, 1)) for _ in range(frames)]
    ids = _prompt(
        4, (MARK_A, 1), (IMAGE, n_img), (MARK_B, 1), 3, *[part for block in video_blocks for part in block], 6
    )
    inputs = _inputs(ids, pixel_values=pixels, image_grid_thw=image_grid, pixel_values_videos=video,
                     video_grid_thw=video_grid)  # fmt: skip
    return ZooModel(family, model, _with_type_ids(model, inputs), {Modality.IMAGE: n_img, Modality.VIDEO: n_vid})


def build_qwen2_vl(attn: str = "sdpa") -> ZooModel:
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2)  # fmt: skip
    return _qwen_vl("qwen2_vl", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", vision, {}, attn)


def build_qwen2_5_vl(attn: str = "sdpa") -> ZooModel:
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, window_size=16, fullatt_block_indexes=[0])  # fmt: skip
    return _qwen_vl("qwen2_5_vl", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", vision, {}, attn)


def build_qwen3_vl(attn: str = "sdpa") -> ZooModel:
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])  # fmt: skip
    rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    return _qwen_vl("qwen3_vl", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", vision,
                    {"rope_parameters": rope}, attn, frames_apart=True)  # fmt: skip


def _idefics(family: str, prefix: str, attn: str) -> ZooModel:
    import transformers

    torch.manual_seed(0)
    vision = getattr(transformers, f"{prefix}VisionConfig")(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=16, patch_size=4)  # fmt: skip
    config = getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=transformers.LlamaConfig(**_text()),
                                                      image_token_id=IMAGE, scale_factor=2)  # fmt: skip
    model = _make(getattr(transformers, f"{prefix}ForConditionalGeneration"), config, attn)
    pixels = torch.randn(1, 1, 3, 16, 16)
    n = _feature_count(model, "image", pixel_values=pixels)
    ids = _prompt(5, (MARK_A, 1), (IMAGE, n), (MARK_B, 1), 8)
    return ZooModel(family, model, _inputs(ids, pixel_values=pixels), {Modality.IMAGE: n})


def build_idefics3(attn: str = "sdpa") -> ZooModel:
    return _idefics("idefics3", "Idefics3", attn)


def build_smolvlm(attn: str = "sdpa") -> ZooModel:
    return _idefics("smolvlm", "SmolVLM", attn)


def build_gemma3(attn: str = "sdpa") -> ZooModel:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

    torch.manual_seed(0)
    text = Gemma3TextConfig(**_text(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]))
    config = Gemma3Config(text_config=text, vision_config=_siglip(), mm_tokens_per_image=4, image_token_index=IMAGE,
                          boi_token_index=MARK_A, eoi_token_index=MARK_B)  # fmt: skip
    model = _make(Gemma3ForConditionalGeneration, config, attn)
    pixels = torch.randn(1, 3, 16, 16)
    n = _feature_count(model, "image", pixel_values=pixels)
    ids = _prompt(5, (MARK_A, 1), (IMAGE, n), (MARK_B, 1), 8)
    inputs = _inputs(ids, pixel_values=pixels, token_type_ids=(ids == IMAGE).long())
    return ZooModel("gemma3", model, inputs, {Modality.IMAGE: n})


def build_paligemma(attn: str = "sdpa") -> ZooModel:
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(0)
    text = GemmaConfig(**_text(head_dim=16))
    config = PaliGemmaConfig(vision_config=_siglip(projection_dim=64), text_config=text, image_token_index=IMAGE,
                             projection_dim=64, hidden_size=64, vocab_size=VOCAB)  # fmt: skip
    model = _make(PaliGemmaForConditionalGeneration, config, attn)
    pixels = torch.randn(1, 3, 16, 16)
    n = _feature_count(model, "image", pixel_values=pixels)
    prefix, suffix = 6, 6
    ids = _prompt((IMAGE, n), prefix, suffix)
    # token_type_ids 0 = image and prefix (attended bidirectionally), 1 = suffix (causal)
    types = torch.cat([torch.zeros(1, n + prefix, dtype=torch.long), torch.ones(1, suffix, dtype=torch.long)], 1)
    return ZooModel("paligemma", model, _inputs(ids, pixel_values=pixels, token_type_ids=types), {Modality.IMAGE: n})


def build_mistral3(attn: str = "sdpa") -> ZooModel:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(0)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=16, patch_size=4, head_dim=16)  # fmt: skip
    config = Mistral3Config(vision_config=vision, text_config=MistralConfig(**_text(sliding_window=None)),
                            image_token_index=IMAGE, spatial_merge_size=2)  # fmt: skip
    model = _make(Mistral3ForConditionalGeneration, config, attn)
    pixels, sizes = torch.randn(1, 3, 16, 16), torch.tensor([[16, 16]])
    n = _feature_count(model, "image", pixel_values=pixels, image_sizes=sizes)
    ids = _prompt(5, (IMAGE, n), 8)
    return ZooModel("mistral3", model, _inputs(ids, pixel_values=pixels, image_sizes=sizes), {Modality.IMAGE: n})


def build_internvl(attn: str = "sdpa") -> ZooModel:
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    torch.manual_seed(0)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=16, patch_size=4)  # fmt: skip
    config = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**_text()), image_token_id=IMAGE,
                            image_seq_length=4)  # fmt: skip
    model = _make(InternVLForConditionalGeneration, config, attn)
    pixels = torch.randn(1, 3, 16, 16)
    n = _feature_count(model, "image", pixel_values=pixels)
    ids = _prompt(5, (MARK_A, 1), (IMAGE, n), (MARK_B, 1), 8)
    return ZooModel("internvl", model, _inputs(ids, pixel_values=pixels), {Modality.IMAGE: n})


def build_aya_vision(attn: str = "sdpa") -> ZooModel:
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, Cohere2Config

    torch.manual_seed(0)
    text = Cohere2Config(**_text(sliding_window=8, layer_types=["sliding_attention", "full_attention"]))
    config = AyaVisionConfig(vision_config=_siglip(), text_config=text, image_token_index=IMAGE, downsample_factor=2)
    model = _make(AyaVisionForConditionalGeneration, config, attn)
    pixels = torch.randn(1, 3, 16, 16)
    n = _feature_count(model, "image", pixel_values=pixels)
    ids = _prompt(5, (IMAGE, n), 8)
    return ZooModel("aya_vision", model, _inputs(ids, pixel_values=pixels), {Modality.IMAGE: n})


def build_glm4v(attn: str = "sdpa") -> ZooModel:
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, image_size=16)  # fmt: skip
    text = _text(rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5})
    config = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                         image_start_token_id=MARK_A, image_end_token_id=MARK_B, video_start_token_id=MARK_C,
                         video_end_token_id=MARK_D)  # fmt: skip
    model = _make(Glm4vForConditionalGeneration, config, attn)
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 4 * 4)
    n = _feature_count(model, "image", pixel_values=pixels, image_grid_thw=grid)
    ids = _prompt(5, (MARK_A, 1), (IMAGE, n), (MARK_B, 1), 8)
    inputs = _with_type_ids(model, _inputs(ids, pixel_values=pixels, image_grid_thw=grid))
    return ZooModel("glm4v", model, inputs, {Modality.IMAGE: n})


def build_llama4(attn: str = "sdpa") -> ZooModel:
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig, Llama4VisionConfig

    torch.manual_seed(0)
    text = Llama4TextConfig(**_text(head_dim=16), intermediate_size_mlp=128, num_local_experts=2,
                            attention_chunk_size=8, no_rope_layers=[1, 0],
                            layer_types=["chunked_attention", "full_attention"])  # fmt: skip
    vision = Llama4VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=4, vision_output_dim=64, projector_input_dim=64,
                                projector_output_dim=64, pixel_shuffle_ratio=0.5)  # fmt: skip
    config = Llama4Config(vision_config=vision, text_config=text, image_token_index=IMAGE, boi_token_index=MARK_A,
                          eoi_token_index=MARK_B)  # fmt: skip
    model = _make(Llama4ForConditionalGeneration, config, attn)
    pixels = torch.randn(1, 3, 16, 16)
    n = _feature_count(model, "image", pixel_values=pixels)
    ids = _prompt(5, (MARK_A, 1), (IMAGE, n), (MARK_B, 1), 8)
    return ZooModel("llama4", model, _inputs(ids, pixel_values=pixels), {Modality.IMAGE: n})


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama", "llama", build_llama, "text"),
        Family("qwen2", "qwen2", build_qwen2, "text"),
        Family("qwen3", "qwen3", build_qwen3, "text", "q/k norms"),
        Family("mistral", "mistral", build_mistral, "text"),
        Family("phi3", "phi3", build_phi3, "text", "fused qkv projection"),
        Family("gemma2", "gemma2", build_gemma2, "text", "sliding-window layers, logit softcapping"),
        Family("gemma3_text", "gemma3", build_gemma3_text, "text", "sliding-window layers"),
        Family("llava", "llava", build_llava, "multimodal"),
        Family("llava_next", "llava_next", build_llava_next, "multimodal", "anyres tiles, newline tokens"),
        Family("llava_onevision", "llava_onevision", build_llava_onevision, "multimodal", "image and video"),
        Family("llava_next_video", "llava_next_video", build_llava_next_video, "multimodal", "video labels"),
        Family("qwen2_vl", "qwen2_vl", build_qwen2_vl, "multimodal", "M-RoPE, image and video"),
        Family("qwen2_5_vl", "qwen2_5_vl", build_qwen2_5_vl, "multimodal", "M-RoPE, image and video"),
        Family("qwen3_vl", "qwen3_vl", build_qwen3_vl, "multimodal", "interleaved M-RoPE, deepstack, image and video"),
        Family("idefics3", "idefics3", build_idefics3, "multimodal", "pixel-shuffle connector"),
        Family("smolvlm", "smolvlm", build_smolvlm, "multimodal", "Idefics3-style connector, own config classes"),
        Family("gemma3", "gemma3", build_gemma3, "multimodal", "sliding-window layers, bidirectional image attention"),
        Family("paligemma", "paligemma", build_paligemma, "multimodal", "bidirectional image + prefix"),
        Family("mistral3", "mistral3", build_mistral3, "multimodal", "Pixtral tower, patch merger"),
        Family("internvl", "internvl", build_internvl, "multimodal", "pixel shuffle"),
        Family("aya_vision", "aya_vision", build_aya_vision, "multimodal", "Cohere2 decoder with sliding layers"),
        Family("glm4v", "glm4v", build_glm4v, "multimodal", "M-RoPE, partial rotary"),
        Family("llama4", "llama4", build_llama4, "multimodal", "chunked-attention layers, MoE"),
    ]
}


# -- the coverage matrix --------------------------------------------------------------------------------

STEPS = 3  # new tokens per run: the prefill graph, then decode graphs (a static one and a dynamic one)
METHOD, BUDGET, METHOD_OPTIONS = "snapkv", 0.5, {"window": 4}
ATTENTIONS = ("sdpa", "eager")
CACHES = ("dynamic", "static")


def generate(model, inputs: dict, steps: int = STEPS, **kwargs):
    """Greedy generate: (new token ids, per-step logits ``[B, steps, V]``, the returned cache)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, **kwargs)  # fmt: skip
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, dim=1), output_cache(out)


def same_outputs(a: tuple, b: tuple, atol: float = 1e-5) -> tuple[bool, bool]:
    """Whether two runs agree at the prefill step and at every decode step (same tokens, close logits)."""
    (tokens_a, logits_a), (tokens_b, logits_b) = a[:2], b[:2]

    def close(x, y):
        return x.shape == y.shape and bool(torch.allclose(x, y, atol=atol, rtol=0))

    prefill = bool(torch.equal(tokens_a[:, :1], tokens_b[:, :1])) and close(logits_a[:, :1], logits_b[:, :1])
    decode = bool(torch.equal(tokens_a[:, 1:], tokens_b[:, 1:])) and close(logits_a[:, 1:], logits_b[:, 1:])
    return prefill, decode


def prompt_labels(zoo: ZooModel) -> torch.Tensor:
    """The modality of every prompt token, read through the config's placeholder ids (``[B, L]``)."""
    ids = zoo.inputs["input_ids"]
    labels = torch.zeros_like(ids)
    for token, modality in modality_token_ids(zoo.model.config).items():
        labels[ids == token] = int(modality)
    return labels


def label_errors(zoo: ZooModel, cache) -> list[str]:
    """Mismatches between each kept slot's label and the modality of the token at its position."""
    expected = prompt_labels(zoo)
    prompt_len = expected.shape[1]
    errors = []
    for index, layer in enumerate(cache.mmkv_layers):
        positions, labels = layer.positions.long(), layer.labels.long()
        in_prompt = positions < prompt_len
        want = torch.zeros_like(labels)  # generated tokens are text
        rows = torch.arange(labels.shape[0]).view(-1, 1, 1).expand_as(positions)
        want[in_prompt] = expected[rows[in_prompt], positions[in_prompt]]
        if not torch.equal(want, labels):
            errors.append(f"layer {index}: {int((want != labels).sum())} slots carry the wrong label")
    return errors


def label_counts(cache) -> dict[Modality, int]:
    """Slots per modality in row 0, KV head 0 of each full-attention layer (all of them must agree; a sliding
    layer holds only its window)."""
    counts = set()
    for layer in cache.mmkv_layers:
        if layer.window:
            continue
        labels = layer.labels[0, 0]
        counts.add(tuple(int((labels == int(m)).sum()) for m in (Modality.IMAGE, Modality.VIDEO)))
    if len(counts) != 1:
        return {}
    image, video = counts.pop()
    return {Modality.IMAGE: image, Modality.VIDEO: video}


def window_layers(model) -> list[int]:
    """Decoder layers MMKVCache leaves to transformers' own cache layer: neither full nor sliding-window
    attention (chunked, linear)."""
    from mmkv_compile.cache import FULL, SLIDING, layer_kinds

    kinds = layer_kinds(model.config.get_text_config(decoder=True))
    return [i for i, kind in enumerate(kinds[0] if kinds else []) if kind not in (FULL, SLIDING)]


@dataclass
class PhaseSites:
    """Decoder attention sites of one phase, merged over that phase's graphs by layer."""

    found: int = 0
    rewritten: int = 0
    encoder: int = 0  # attention that reads no cache (vision towers), only counted
    left_alone: dict[int, str] = field(default_factory=dict)  # layer -> why


def phase_sites(reports, phase: str) -> PhaseSites:
    layers: dict = {}
    encoder = 0
    for graph in reports:
        if graph.phase != phase and not (phase == "prefill" and graph.phase == "no mmkv cache"):
            continue
        for site in graph.sites:
            if site.cache == "none":
                encoder += 1 if graph.phase == phase or phase == "prefill" else 0
                continue
            key = site.layer if site.layer is not None else f"{graph.index}:{site.module}"
            rewritten, reason = layers.get(key, (False, ""))
            layers[key] = (rewritten or site.rewritten, reason or ("" if site.rewritten else site.reason))
    out = PhaseSites(found=len(layers), rewritten=sum(1 for r, _ in layers.values() if r), encoder=encoder)
    out.left_alone = {k: why for k, (r, why) in layers.items() if not r and isinstance(k, int)}
    return out


@dataclass
class Row:
    """One cell of the coverage matrix: a family, an attention implementation and a cache."""

    family: str
    attention: str
    cache: str
    status: str = "ok"  # "ok", "skipped: ...", "FAILED: ..."
    prefill: PhaseSites | None = None
    decode: PhaseSites | None = None
    identity: tuple[bool, bool] | None = None  # prefill, decode at budget 1.0 (static: compiled vs uncompiled)
    kept: tuple[int, int] | None = None  # physical, logical slots of the first compressed layer after generate
    labels: str = ""
    placeholders: dict = field(default_factory=dict)  # modality -> placeholder tokens in input_ids
    features: dict = field(default_factory=dict)  # modality -> feature vectors the vision code produced
    cached: dict = field(default_factory=dict)  # modality -> slots labelled so at budget 1.0
    label_errors: list[str] = field(default_factory=list)  # kept slots whose label is not their token's
    window_layers: list[int] = field(default_factory=list)  # decoder layers whose type is not full attention
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def first_layer_slots(cache) -> tuple[int, int] | None:
    """Physical and logical slots of the cache's first compressed layer, or None when it has none."""
    layer = cache.mmkv_layers[0] if cache.mmkv_layers else None
    return (layer.get_physical_length(), layer.get_seq_length()) if layer is not None else None


def _mmkv_warnings(caught) -> list[str]:
    from mmkv_compile.backend import MMKVWarning

    return [str(w.message) for w in caught if issubclass(w.category, MMKVWarning)]


def run_dynamic(family: Family, attn: str, steps: int = STEPS) -> Row:
    """Identity at budget 1.0 and compression at :data:`BUDGET` with the cache generate makes."""
    import mmkv_compile

    row = Row(family.name, attn, "DynamicCache")
    reference = family.build(attn)
    ref = generate(reference.model, reference.inputs, steps)
    full = family.build(attn)
    mmkv_compile.compile(full.model, METHOD, 1.0, inductor=False, **METHOD_OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(full.model, full.inputs, steps)
    row.identity = same_outputs(ref, out)
    row.placeholders = {m: n for m, n in full.count_in_prompt().items() if n}
    row.features = {m: n for m, n in full.placeholders.items() if n}
    row.cached = {m: n for m, n in label_counts(out[2]).items() if n}
    row.labels = ", ".join(f"{m.name.lower()} {row.cached.get(m, 0)}/{n}" for m, n in row.placeholders.items())
    row.labels = row.labels or "text only"
    if not row.cached == row.placeholders == row.features:
        row.labels += " MISMATCH"
    row.window_layers = window_layers(full.model)
    compressed = family.build(attn)
    mmkv_compile.compile(compressed.model, METHOD, BUDGET, inductor=False, **METHOD_OPTIONS)
    with warnings.catch_warnings(record=True) as more:
        warnings.simplefilter("always")
        _, _, cache = generate(compressed.model, compressed.inputs, steps)
    reports = mmkv_compile.compiled_reports(compressed.model)
    row.prefill, row.decode = phase_sites(reports, "prefill"), phase_sites(reports, "decode")
    row.kept = first_layer_slots(cache)
    row.label_errors = label_errors(compressed, cache)
    if row.label_errors:
        row.labels += " WRONG AFTER EVICTION: " + "; ".join(row.label_errors)
    row.warnings = sorted(set(_mmkv_warnings(caught) + _mmkv_warnings(more)))
    return row


def run_static(family: Family, attn: str, steps: int = STEPS) -> Row:
    """generate(cache_implementation="static") on the compiled model: it compresses into an MMKVCache of fixed
    capacity, with the tokens, logits and kept slots the compiled model gives with generate's default cache."""
    import mmkv_compile

    row = Row(family.name, attn, "StaticCache")
    default = family.build(attn)
    mmkv_compile.compile(default.model, METHOD, BUDGET, inductor=False, **METHOD_OPTIONS)
    ref = generate(default.model, default.inputs, steps)
    static = family.build(attn)
    mmkv_compile.compile(static.model, METHOD, BUDGET, inductor=False, **METHOD_OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(static.model, static.inputs, steps, cache_implementation="static")
    prefill, decode = same_outputs(ref, out)
    same_slots = len(ref[2].mmkv_layers) == len(out[2].mmkv_layers) and all(
        torch.equal(a.positions, b.positions) for a, b in zip(ref[2].mmkv_layers, out[2].mmkv_layers)
    )
    row.identity = prefill, decode and same_slots
    reports = mmkv_compile.compiled_reports(static.model)
    row.prefill, row.decode = phase_sites(reports, "prefill"), phase_sites(reports, "decode")
    row.window_layers = window_layers(static.model)
    row.kept = first_layer_slots(out[2])
    row.label_errors = label_errors(static, out[2])
    row.labels = "WRONG AFTER EVICTION: " + "; ".join(row.label_errors) if row.label_errors else "-"
    row.warnings = _mmkv_warnings(caught)
    return row


def run_case(family: Family, attn: str, cache: str, raise_errors: bool = False, steps: int = STEPS) -> Row:
    """One matrix cell; a family transformers cannot build with ``attn`` is reported as skipped."""
    start = time.perf_counter()
    try:
        plain = family.build(attn)
    except (ValueError, NotImplementedError) as exc:  # e.g. no sdpa support in this family
        return Row(family.name, attn, cache, status=f"skipped: {str(exc).split('.')[0]}")
    try:
        with torch.no_grad():
            plain.model(**plain.inputs)
    except Exception as exc:  # noqa: BLE001 - transformers' own model is broken in this release: not ours to test
        import transformers

        why = f"{type(exc).__name__}: {str(exc)[:120]}"
        return Row(
            family.name,
            attn,
            cache,
            status=f"skipped: fails uncompiled in transformers {transformers.__version__} ({why})",
        )
    try:
        row = run_dynamic(family, attn, steps) if cache == "dynamic" else run_static(family, attn, steps)
    except Exception as exc:  # report, do not stop the matrix
        if raise_errors:
            raise
        row = Row(family.name, attn, cache, status=f"FAILED: {type(exc).__name__}: {str(exc)[:200]}")
    row.seconds = time.perf_counter() - start
    return row


# -- the markdown table ---------------------------------------------------------------------------------


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "**NO**")


def _sites(sites: PhaseSites | None) -> str:
    return "-" if sites is None else f"{sites.rewritten}/{sites.found}"


def _left_alone(row: Row) -> str:
    layers = sorted(
        set((row.prefill.left_alone if row.prefill else {}) | (row.decode.left_alone if row.decode else {}))
    )
    return ", ".join(map(str, layers)) or "-"


def _kept(row: Row) -> str:
    if row.kept is None:
        return "-"
    physical, logical = row.kept
    return f"{physical}/{logical}" + ("" if physical < logical else " **not shrunk**")


def to_markdown(rows: list[Row], command: str, seconds: float) -> str:
    from mmkv_compile.backend import MMKVWarning  # noqa: F401  (the warning class the table counts)

    families = {f.name: f for f in FAMILIES.values()}
    ok = [r for r in rows if r.status == "ok"]
    dynamic = [r for r in ok if r.cache == "DynamicCache"]
    static = [r for r in ok if r.cache == "StaticCache"]
    passed = [r for r in dynamic if all(r.identity) and "MISMATCH" not in r.labels and "WRONG" not in r.labels
              and r.kept is not None and r.kept[0] < r.kept[1]]  # fmt: skip
    static_ok = [r for r in static if all(r.identity) and not any("StaticCache" in w for w in r.warnings)
                 and not r.label_errors and r.kept is not None and r.kept[0] < r.kept[1]]  # fmt: skip
    lines = [
        "# Model coverage",
        "",
        "<!-- generated by `python -m mmkv_compile.testing.zoo --out docs/models.md`; do not edit by hand -->",
        "",
        f"Generated by `{command}` on {platform.machine()} ({torch.__version__}, transformers "
        f"{importlib.import_module('transformers').__version__}), {time.strftime('%Y-%m-%d')}, in {seconds:.0f} s. "
        "Every row is a tiny random-weight model built from transformers' config classes by a builder in "
        "`mmkv_compile/testing/zoo.py` (2 decoder layers, a one-layer vision tower, a few image tokens; no download), "
        f"run through `generate` for {STEPS} new tokens. The library has no per-family code.",
        "",
        f"Summary: {len(passed)}/{len(dynamic)} DynamicCache cells pass every check; "
        f"{len(static_ok)}/{len(static)} StaticCache cells compress exactly as the DynamicCache route does, "
        f"with no StaticCache warning; {len(rows) - len(ok)} cells not run (see the status column).",
        "",
        "Columns:",
        "",
        f"- **sites prefill / decode**: decoder attention sites rewritten / found in the captured graphs of "
        f"each phase (`{METHOD}`, budget {BUDGET}). Vision-tower attention runs before the decoder (generate "
        "calls `get_image_features` eagerly) and is not counted.",
        "- **left alone**: decoder layers mmkv does not compress (chunked or linear attention: MMKVCache keeps "
        "transformers' own layer and mask; `explain` reports them with that reason). Sliding-window layers are "
        "compressed within their window.",
        "- **identity prefill / decode**: at budget 1.0 the compiled model gives the same tokens and logits "
        "(atol 1e-5) as the uncompiled one, at the prefill step and at every decode step. For StaticCache: "
        f'compiled (`{METHOD}`, budget {BUDGET}) with `cache_implementation="static"` against the same compiled '
        "model with generate's default cache: the same tokens, logits and, for decode, kept slots.",
        f"- **KV kept**: physical / logical slots of the first compressed layer after generate at budget "
        f"{BUDGET} (memory is freed, not masked).",
        "- **labels**: cached slots labelled image / video at budget 1.0, against the placeholder tokens in "
        "`input_ids` (and the features the model's vision code produced); after eviction every kept slot's "
        "label is also checked against the token at its position.",
        "- **MMKVWarnings**: distinct warnings during the run.",
        "",
        "| family | exercises | attention | cache | sites prefill | sites decode | left alone | identity prefill "
        "| identity decode | KV kept | labels | MMKVWarnings | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fam = families.get(r.family)
        prefill_id, decode_id = r.identity if r.identity else (None, None)
        lines.append(
            f"| {r.family} | {fam.exercises if fam else ''} | {r.attention} | {r.cache} | {_sites(r.prefill)} "
            f"| {_sites(r.decode)} | {_left_alone(r)} | {_yes(prefill_id)} | {_yes(decode_id)} | {_kept(r)} "
            f"| {r.labels or '-'} | {len(r.warnings)} | {r.status} |"
        )
    messages = sorted({w for r in rows for w in r.warnings})
    if messages:
        lines += ["", "Warnings seen (each given once per compiled model):", ""]
        lines += [f"- {m}" for m in messages]
    lines += ["", STATIC_CACHE_NOTE, ""]
    return "\n".join(lines)


STATIC_CACHE_NOTE = """## StaticCache

A `StaticCache` (`generate(..., cache_implementation="static")`) is a set of fixed-size buffers written in
place, allocated up front so that decode shapes and addresses stay the same from step to step (CUDA graphs).
It cannot shrink. `mmkv_compile.compile` therefore replaces an empty one by an `MMKVCache` of fixed capacity:
the prompt is compressed, and each full-attention layer's capacity buffers are allocated once with room for
what the StaticCache would have held beyond the prompt (its `max_cache_len` minus the prompt); decode steps
write into them in place, with static shapes (methods that evict while decoding append by copying instead).
The rows above check that this compresses exactly as generate's default cache does. A `StaticCache` that
already holds tokens, or one reaching the `torch.compile(model, backend="mmkv")` route, is left alone: the
model compiles unchanged and one `MMKVWarning` says why; `explain` reports each decoder site with
`cache=static_cache` and the same reason."""


def run_matrix(names=None, attentions=ATTENTIONS, caches=CACHES, log=print) -> list[Row]:
    rows = []
    for name in names or FAMILIES:
        family = FAMILIES[name]
        if not family.available():
            rows.append(Row(name, "-", "-", status=f"skipped: transformers {family.module} is not installed"))
            continue
        for attn in attentions:
            for cache in caches:
                row = run_case(family, attn, "dynamic" if cache in ("dynamic", "DynamicCache") else "static")
                log(f"{row.family:18} {row.attention:6} {row.cache:13} {row.status} ({row.seconds:.1f} s)")
                rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run every family through the mmkv matrix; write docs/models.md")
    parser.add_argument("--out", default="docs/models.md")
    parser.add_argument("--families", nargs="*", default=None, choices=sorted(FAMILIES))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.perf_counter()
    rows = run_matrix(args.families)
    command = (
        "python -m mmkv_compile.testing.zoo --out "
        + args.out
        + (" --families " + " ".join(args.families) if args.families else "")
    )
    text = to_markdown(rows, command, time.perf_counter() - start)
    with open(args.out, "w") as handle:
        handle.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
