"""The cards task (``mmkv_compile.bench.cards``), its shipped trained VLM, and ``mmkv bench quality`` on it.

The model checks compare the bench's scoring with an independent reference, plain ``generate`` on the
uncompiled model, and check that random eviction at a 10% budget answers worse than the full cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from mmkv_compile.bench import cards
from mmkv_compile.bench.models import CARDS, CARDS_TASK, load_bench_model
from mmkv_compile.bench.quality import QualitySettings, answer_logits, cards_samples, keep_count, random_keep
from mmkv_compile.cache import MMKVCache

SHIPPED_SIZE_LIMIT = 10 * 2**20  # the checkpoint ships in the repository: under 10 MiB
CHECK_SEED = 7  # --seed of the model checks' questions (a set the training never saw, like every eval seed)
CHECK_QUESTIONS = 12  # three per kind of cards.BENCH_KINDS
FULL_CACHE_FLOOR = 0.9  # the full cache answers at least this share of them (the model card reports ~all)
RANDOM_MARGIN = 0.2  # random eviction at RANDOM_BUDGET loses at least this much accuracy
RANDOM_BUDGET = 0.1


def _words(sample: cards.CardsSample) -> list[str]:
    return cards.decode(sample.input_ids[0], skip_special=False).split()


# -- the task ---------------------------------------------------------------------------------------------


def test_vocabulary_round_trip():
    text = "<bos> image 12 : <image> what digit is on the card that is red 7 <eos>"
    ids = cards.encode(text)
    assert cards.decode(ids, skip_special=False) == text
    assert cards.decode(ids) == "image 12 : what digit is on the card that is red 7"
    assert len(set(cards.VOCAB)) == len(cards.VOCAB)
    with pytest.raises(ValueError):
        cards.encode("what colour is it ?")


@pytest.mark.parametrize("kind", [None, *cards.QUESTION_KINDS])
def test_samples_are_deterministic_per_seed(kind):
    first, again, other = cards.make_sample(7, 16, kind), cards.make_sample(7, 16, kind), cards.make_sample(8, 16, kind)
    assert torch.equal(first.input_ids, again.input_ids)
    assert torch.equal(first.pixel_values, again.pixel_values)
    assert (first.answer, first.kind, first.cards) == (again.answer, again.kind, again.cards)
    assert not torch.equal(first.pixel_values, other.pixel_values)


def test_evaluation_seeds_never_meet_training_seeds():
    seeds = cards.evaluation_seeds(5000)
    assert len(set(seeds)) == 5000 and max(seeds) < cards.TRAIN_SEED_OFFSET
    with pytest.raises(ValueError):
        cards.evaluation_seeds(10, seed=cards.TRAIN_SEED_OFFSET - 5)
    with pytest.raises(ValueError):  # the training data refuses held-out seeds
        cards.make_training_sequence(seeds[-1], 16)


def test_bench_seeds_pick_disjoint_balanced_question_sets():
    first, second = (cards_samples(QualitySettings(seed=seed, questions=10)) for seed in (0, 1))
    assert not {s.seed for s in first} & {s.seed for s in second}
    assert [s.kind for s in first] == list(cards.BENCH_KINDS) * 2 + list(cards.BENCH_KINDS[:2])


@pytest.mark.parametrize("num_images", [16, 24])
def test_image_tokens_match_the_images(num_images):
    sample = cards.make_sample(3, num_images)
    assert cards.TOKENS_PER_IMAGE == (cards.IMAGE_SIZE // cards.PATCH_SIZE) ** 2
    image_tokens = int((sample.input_ids == cards.IMAGE_TOKEN_ID).sum())
    assert image_tokens == num_images * cards.TOKENS_PER_IMAGE == sample.image_token_count
    assert sample.pixel_values.shape == (num_images, 3, cards.IMAGE_SIZE, cards.IMAGE_SIZE)
    assert sample.pixel_values.abs().max() <= 1.0
    words = _words(sample)
    assert words[0] == cards.BOS_TOKEN
    for number, (start, end) in enumerate(sample.image_spans, start=1):
        assert words[start - 3 : start] == ["image", str(number), ":"]
        assert set(words[start:end]) == {cards.IMAGE_TOKEN} and end - start == cards.TOKENS_PER_IMAGE
    assert " ".join(words[sample.question_start :]) == sample.question
    assert sample.answer_ids == cards.encode(sample.answer) + [cards.EOS_TOKEN_ID]


def test_cards_are_drawn_as_described():
    left, top = cards.GLYPH_LEFT, cards.GLYPH_TOP
    red_one = cards.render_card(cards.Card("red", 1))
    assert tuple(red_one[0, 0]) == cards.COLOURS["red"]  # the background is the card's colour
    assert red_one[top + 3, left + 7].max() == 0  # "1" lights the right-hand segments only
    assert tuple(red_one[top + 3, left]) == cards.COLOURS["red"]
    eight = cards.render_card(cards.Card("blue", 8, shift_x=1))
    assert eight[top + 5, left + 1 + 3].max() == 0  # the middle bar, one pixel to the right
    noisy = cards.render_card(cards.Card("blue", 8), np.random.default_rng(0))
    clean = cards.render_card(cards.Card("blue", 8))
    assert 0 < abs(noisy.astype(int) - clean.astype(int)).max() <= cards.PIXEL_NOISE


def _expected_answer(sample: cards.CardsSample) -> str:
    """The answer recomputed from the sample's cards and facts by reading its question's words."""
    words = sample.question.split()
    if sample.kind == "digit_by_index":
        return str(sample.cards[int(words[-1]) - 1].digit)
    if sample.kind == "digit_by_colour":
        (card,) = [card for card in sample.cards if card.colour == words[-1]]
        return str(card.digit)
    if sample.kind == "compare":
        first, second = (int(words[index + 1]) for index, word in enumerate(words) if word == "image")
        return "yes" if sample.cards[first - 1].digit > sample.cards[second - 1].digit else "no"
    if sample.kind == "count":
        return str(sum(card.colour == words[-1] for card in sample.cards))
    if sample.kind == "text_needle":
        start, end = sample.fact_spans[words[-1]]  # the fact sentence really is in the prompt
        assert _words(sample)[start:end] == ["the", words[-1], "is", str(sample.facts[words[-1]]), "."]
        return str(sample.facts[words[-1]])
    raise AssertionError(sample.kind)


@pytest.mark.parametrize("kind", cards.QUESTION_KINDS)
def test_each_kind_has_the_right_answer(kind):
    answers = set()
    for seed in range(40):
        sample = cards.make_sample(seed, 16 + seed % 9, kind)
        assert sample.answer == _expected_answer(sample), (seed, sample.question)
        answers.add(sample.answer)
    assert len(answers) >= 2  # answers vary from seed to seed


def test_training_sequence_labels_only_answers():
    questions = 3
    sequence = cards.make_training_sequence(cards.TRAIN_SEED_OFFSET + 5, 16, questions=questions)
    labelled = [token for token in sequence.labels if token != -100]
    assert labelled.count(cards.EOS_TOKEN_ID) == questions and len(labelled) == 2 * questions  # word, eos
    assert sequence.input_ids.count(cards.IMAGE_TOKEN_ID) == 16 * cards.TOKENS_PER_IMAGE


# -- the shipped model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_model():
    checkpoint = cards.default_checkpoint()
    assert (checkpoint / "model.safetensors").is_file(), f"the shipped checkpoint is missing from {checkpoint}"
    torch.manual_seed(0)
    return load_bench_model(CARDS)


@pytest.fixture(scope="module")
def check_samples():
    return cards_samples(QualitySettings(seed=CHECK_SEED, questions=CHECK_QUESTIONS))


def test_shipped_checkpoint_is_small_and_is_the_built_config(bench_model):
    size = sum(path.stat().st_size for path in cards.default_checkpoint().iterdir())
    assert size < SHIPPED_SIZE_LIMIT
    assert bench_model.task == CARDS_TASK and cards.is_cards_checkpoint(cards.default_checkpoint())
    built, shipped = cards.build_model_config(), bench_model.fresh().config
    assert shipped.image_token_index == cards.IMAGE_TOKEN_ID
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(shipped.text_config, name) == getattr(built.text_config, name)
        assert getattr(shipped.vision_config, name) == getattr(built.vision_config, name)
    assert shipped.text_config.num_key_value_heads == built.text_config.num_key_value_heads


def _exact_matches(model, samples, make_cache, after_prefill=None) -> list[bool]:
    matches = []
    for sample in samples:
        logits, _ = answer_logits(model, sample, make_cache(), after_prefill)
        matches.append(logits.argmax(-1).tolist() == sample.answer_ids)
    return matches


@pytest.fixture(scope="module")
def full_cache_matches(bench_model, check_samples) -> list[bool]:
    """The bench's scoring of the full cache (question fed after the prefill, one token per call)."""
    return _exact_matches(bench_model.fresh(), check_samples, DynamicCache)


def test_full_cache_answers_and_the_bench_scores_as_generate_does(bench_model, check_samples, full_cache_matches):
    model = bench_model.fresh()
    generated = [cards.answer(model, sample) == sample.answer for sample in check_samples]  # the reference
    assert sum(generated) >= FULL_CACHE_FLOOR * len(check_samples), generated
    assert full_cache_matches == generated


def test_random_eviction_at_a_tenth_scores_lower(bench_model, check_samples, full_cache_matches):
    model = bench_model.fresh()
    full = sum(full_cache_matches)
    generator = torch.Generator().manual_seed(0)
    evicted = _exact_matches(model, check_samples, lambda: MMKVCache(model.config),
                             lambda cache: random_keep(cache, RANDOM_BUDGET, generator))  # fmt: skip
    assert sum(evicted) <= full - RANDOM_MARGIN * len(check_samples), (sum(evicted), full)


def test_bench_quality_cards_end_to_end(tmp_path):
    """The CLI on the shipped model (eager operator, so nothing compiles): rows, kept shares, plot."""
    out = tmp_path / "cards"
    questions, budget = 5, 0.2
    cmd = [sys.executable, "-m", "mmkv_compile.cli", "bench", "quality", "--model", CARDS, "--questions",
           str(questions), "--methods", "snapkv", "--budgets", "1.0", str(budget), "--eager-operator",
           "--device", "cpu", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {(row["source"], row["method"], row["budget"]): row for row in results["rows"]}
    assert set(rows) == {("full cache", "full", None), ("mmkv", "snapkv", 1.0), ("mmkv", "snapkv", budget),
                         ("random", "random", 1.0), ("random", "random", budget)}  # fmt: skip
    full = rows["full cache", "full", None]
    for key in ("mmkv", "snapkv", 1.0), ("random", "random", 1.0):  # budget 1.0 keeps everything
        assert rows[key]["accuracy"] == full["accuracy"] and rows[key]["kl"] < 1e-6
        assert rows[key]["image_kept"] == rows[key]["text_kept"] == 1.0
    context = cards_samples(QualitySettings(questions=1))[0].question_start
    for key in ("mmkv", "snapkv", budget), ("random", "random", budget):
        row = rows[key]
        image_tokens = 16 * cards.TOKENS_PER_IMAGE
        kept = row["image_kept"] * image_tokens + row["text_kept"] * (context - image_tokens)
        assert kept == pytest.approx(keep_count(budget, context), abs=1e-3)  # per layer and head, on average
        assert row["kl"] > 0
    assert len(results["trials"]) == questions * len(rows)
    assert (out / "table.md").read_text().strip() in result.stdout
    if "matplotlib is not installed" not in result.stderr:
        assert (out / "quality_cards.png").stat().st_size > 0
