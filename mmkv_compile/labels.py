"""Modality labels of cached tokens, derived from a model's inputs and its config.

Every cached slot carries one int8 label. The codes match transformers' ``mm_token_type_ids``
(0 text, 1 image, 2 video), so that tensor is used as-is where a model provides it.
"""

from __future__ import annotations

import re
from enum import IntEnum

import torch


class Modality(IntEnum):
    """Label of one cached slot. ``INVALID`` marks padding and slots a row does not use."""

    INVALID = -1
    TEXT = 0
    IMAGE = 1
    VIDEO = 2
    AUDIO = 3


LABEL_DTYPE = torch.int8

# Config attributes that name a placeholder token of a modality, e.g. `image_token_id` (Qwen2-VL),
# `image_token_index` (LLaVA), `video_token_id`. Markers such as `vision_start_token_id` stay text.
_TOKEN_ATTR = re.compile(r"^(image|video|audio)_token_(id|index)$")


def modality_token_ids(config) -> dict[int, Modality]:
    """Map placeholder token ids to their modality, read from a transformers config and its sub-configs."""
    found: dict[int, Modality] = {}
    seen: set[int] = set()

    def visit(cfg) -> None:
        if cfg is None or id(cfg) in seen:
            return
        seen.add(id(cfg))
        for name, value in vars(cfg).items():
            match = _TOKEN_ATTR.match(name)
            if match and isinstance(value, int) and value >= 0:
                found.setdefault(value, Modality[match.group(1).upper()])
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
                visit(value)

    visit(config)
    return found


def labels_from_inputs(
    token_ids: dict[int, Modality],
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    num_new: int | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Labels ``[batch, num_new]`` of the tokens a forward call appends to the cache.

    ``mm_token_type_ids`` wins where given; otherwise ``input_ids`` are matched against ``token_ids``.
    Positions where the 2-D ``attention_mask`` is 0 (padding) are labelled ``INVALID``.
    """
    if mm_token_type_ids is not None:
        labels = mm_token_type_ids.to(LABEL_DTYPE)
    elif input_ids is not None:
        labels = torch.zeros(input_ids.shape, dtype=LABEL_DTYPE, device=input_ids.device)
        for token_id, modality in token_ids.items():
            labels = torch.where(input_ids == token_id, int(modality), labels).to(LABEL_DTYPE)
    else:
        if num_new is None or batch_size is None:
            raise ValueError("labels_from_inputs needs input_ids, mm_token_type_ids, or num_new and batch_size")
        device = attention_mask.device if attention_mask is not None else None
        labels = torch.zeros((batch_size, num_new), dtype=LABEL_DTYPE, device=device)
    if attention_mask is not None and attention_mask.dim() == 2:
        step_mask = attention_mask[:, -labels.shape[-1] :]
        labels = torch.where(step_mask.bool(), labels, int(Modality.INVALID)).to(LABEL_DTYPE)
    return labels
