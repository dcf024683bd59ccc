"""Train the tiny cards vision-language model (``mmkv_compile/bench/cards.py``) on CPU, from scratch.

    python benchmarks/train_cards_vlm.py            # writes mmkv_compile/assets/cards_vlm (--out to change)

Training runs through phases (``--schedule``): each phase names its steps, the question kinds it asks and how
many images its prompts show. The default schedule adds one kind at a time on short prompts (4-8 images),
keeps asking the earlier kinds so they are not forgotten, and ends on 16-24 images (the benchmark shows 16).
Each training prompt is followed by ``--questions`` question/answer pairs; the answer loss is on answer and
eos tokens only.

Helper losses, on parts of the model thrown away after training (weights ``--aux-weight`` etc.):

* card heads: two linear heads classify each card's digit and colour, one from the projected image tokens
  (so the vision tower learns to see before the decoder learns where to look), one from the image tokens'
  hidden states at ``--attention-layer`` (so the decoder keeps that content where the retrieving head reads);
* an index probe reads each image token's image number from the decoder's middle layer, so image tokens carry
  the number of the "image k :" label before them (what "what digit is in image 7" has to match);
* supervised attention: at each question's last token, head 0 of ``--attention-layer`` is pushed to attend to
  the asked-about image's tokens (or the fact's value), head 1 to the first image of a comparison. ``count``
  gets no attention target: the model has to learn to count by itself;
* a penalty keeps the projected image tokens at the scale of the text embeddings (the card head alone would
  blow them up until nothing the decoder adds to them shows).

Data seeds are fixed: prompt ``i`` of step ``t`` uses seed ``TRAIN_SEED_OFFSET + args.seed * 100_000_000 +
t * batch + i``; weights are initialised from ``torch.manual_seed(args.seed)``. The saved model (bfloat16,
``save_pretrained`` safetensors) is loaded back and scored with plain greedy ``generate`` on held-out seeds
(question inside the prompt, full cache); the numbers go to ``training.json`` next to it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import platform
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers


def _load_cards_module():
    """``mmkv_compile/bench/cards.py`` on its own: the task needs nothing else from the package, so training
    does not import (or depend on) the compile backend."""
    path = Path(__file__).resolve().parent.parent / "mmkv_compile" / "bench" / "cards.py"
    spec = importlib.util.spec_from_file_location("mmkv_cards_task", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


cards = _load_cards_module()

DEFAULT_SCHEDULE = ",".join(
    [
        "300:text_needle:4-8",
        "500:digit_by_colour+text_needle:4-8",
        "700:digit_by_index+digit_by_index+digit_by_colour+text_needle:4-6",
        "700:count+count+digit_by_index+digit_by_colour+text_needle:4-8",
        "700:compare+compare+count+digit_by_index+digit_by_colour+text_needle:4-8",
        "600:all:8-16",
        "1000:all:16-24",
    ]
)
DIGIT_IDS = [cards.TOKEN_IDS[str(digit)] for digit in range(10)]


@dataclass
class Phase:
    steps: int
    kinds: tuple[str, ...]  # a kind named twice is asked twice as often
    min_images: int
    max_images: int


def parse_schedule(text: str) -> list[Phase]:
    """``STEPS:KIND+KIND:IMAGES,...`` with IMAGES ``N`` or ``MIN-MAX`` and KIND ``all`` for every kind."""
    phases = []
    for part in text.split(","):
        steps, kinds, images = part.split(":")
        names = cards.QUESTION_KINDS if kinds == "all" else tuple(kinds.split("+"))
        unknown = set(names) - set(cards.QUESTION_KINDS)
        if unknown:
            raise ValueError(f"unknown question kinds {sorted(unknown)} in schedule phase {part!r}")
        low, _, high = images.partition("-")
        phases.append(Phase(int(steps), names, int(low), int(high or low)))
    return phases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default=DEFAULT_SCHEDULE, help="training phases, STEPS:KIND+KIND:IMAGES,...")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the schedule's)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--questions", type=int, default=4, help="question/answer pairs after each training prompt")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    parser.add_argument("--decay-steps", type=int, default=800, help="cosine decay over the last steps, to lr * 0.05")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="weight init and data seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--aux-weight", type=float, default=1.0, help="card digit and colour classification head")
    parser.add_argument("--index-probe-weight", type=float, default=1.0, help="image-number probe on image tokens")
    parser.add_argument(
        "--attention-weight",
        type=float,
        default=1.0,
        help="supervised attention: one head of --attention-layer looks at the asked-about tokens",
    )
    parser.add_argument("--attention-layer", type=int, default=2)
    parser.add_argument("--count-attention-weight", type=float, default=0.0,
                        help="supervised attention for count: head 2 of --attention-layer spreads evenly over the cards")  # fmt: skip
    parser.add_argument("--scale-weight", type=float, default=1.0, help="image token scale penalty")
    parser.add_argument("--init-from", type=Path, default=None, help="start from this checkpoint, not from scratch")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-count", type=int, default=150, help="held-out questions in the periodic check")
    parser.add_argument(
        "--final-eval",
        default="16:500,20:200,24:200",
        help="held-out questions per number of images for the final generate check",
    )
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--text-hidden", type=int, default=128)
    parser.add_argument("--text-intermediate", type=int, default=384)
    parser.add_argument("--text-heads", type=int, default=4)
    parser.add_argument("--text-kv-heads", type=int, default=2)
    parser.add_argument("--text-init-std", type=float, default=0.02, help="std of the decoder's initial weights")
    parser.add_argument("--vision-hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("mmkv_compile/assets/cards_vlm"))
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--card-only", action="store_true", help="only rewrite --out's README.md from training.json")
    parser.add_argument("--card-note", default="", help="a paragraph the model card adds after the accuracy")
    return parser.parse_args(argv)  # fmt: skip


def collate(sequences: list[cards.TrainingSequence]) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels, the batch's images in prompt order, and card labels."""
    length = max(len(sequence.input_ids) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), cards.PAD_TOKEN_ID, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        size = len(sequence.input_ids)
        input_ids[row, :size] = torch.tensor(sequence.input_ids)
        labels[row, :size] = torch.tensor(sequence.labels)
        attention_mask[row, :size] = 1
    all_cards = [card for sequence in sequences for card in sequence.cards]
    colour_index = {colour: index for index, colour in enumerate(cards.COLOURS)}
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.cat([sequence.pixel_values for sequence in sequences]),
        "card_digits": torch.tensor([card.digit for card in all_cards]),
        "card_colours": torch.tensor([colour_index[card.colour] for card in all_cards]),
        "card_numbers": torch.tensor([number for sequence in sequences for number in range(len(sequence.cards))]),
        "targets": [(row, *target) for row, sequence in enumerate(sequences) for target in sequence.attention_targets],
        "count_targets": [
            (row, *target) for row, sequence in enumerate(sequences) for target in sequence.count_targets
        ],
    }


class ProjectorTap:
    """Keeps the projector's output (the image tokens the decoder sees) of the latest forward."""

    def __init__(self, model: torch.nn.Module):
        self.features: torch.Tensor | None = None
        model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.features = output


def supervised_attention_loss(attention: torch.Tensor, targets: list) -> torch.Tensor:
    """Minus the log of the attention mass that head 0 (and, for a second target, head 1) of one layer puts
    on the tokens the answer must be read from, at each question's last token."""
    losses = []
    for row, query, first, second in targets:
        for head, positions in ((0, first), (1, second)):
            if positions:
                mass = attention[row, head, query, positions].float().sum()
                losses.append(-torch.log(mass + 1e-6))
    return torch.stack(losses).mean() if losses else attention.new_zeros(())


COUNT_HEAD = 2  # heads 0 and 1 of --attention-layer retrieve (supervised_attention_loss); head 2 counts


def uniform_attention_loss(attention: torch.Tensor, targets: list) -> torch.Tensor:
    """KL(uniform || attention) of head ``COUNT_HEAD`` over every image token, at each "count" question's last
    token: attending evenly to all cards, its output is the share of cards of each colour, which the decoder
    turns into a count (exact for a fixed number of cards, such as the benchmark's 16)."""
    losses = []
    for row, query, positions in targets:
        weights = attention[row, COUNT_HEAD, query, positions].float()
        losses.append(-torch.log(weights + 1e-6).mean() - math.log(len(positions)))
    return torch.stack(losses).mean() if losses else attention.new_zeros(())


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (answer and eos) positions only."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def learning_rate(step: int, total_steps: int, args: argparse.Namespace) -> float:
    """Linear warm-up, constant, then a cosine decay to 5% over the last ``--decay-steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    decay_start = total_steps - args.decay_steps
    if step < decay_start:
        return args.lr
    progress = (step - decay_start) / max(1, args.decay_steps)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def held_out_batches(
    count: int, image_counts: tuple[int, ...], batch: int
) -> list[tuple[list[cards.CardsSample], dict[str, torch.Tensor]]]:
    """Held-out samples (images cycling through ``image_counts``) as teacher-forced batches of one image count."""
    by_images = defaultdict(list)
    for index, seed in enumerate(cards.evaluation_seeds(count)):
        num_images = image_counts[index % len(image_counts)]
        by_images[num_images].append(cards.make_sample(seed, num_images))
    batches = []
    for samples in by_images.values():
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            sequences = [
                cards.TrainingSequence(
                    sample.input_ids[0].tolist() + sample.answer_ids,
                    [-100] * sample.input_ids.shape[1] + sample.answer_ids,
                    sample.pixel_values,
                    sample.cards,
                )
                for sample in chunk
            ]
            batches.append((chunk, collate(sequences)))
    return batches


@torch.no_grad()
def teacher_forced_accuracy(model: torch.nn.Module, batches) -> dict[str, float]:
    """Share of held-out questions whose every answer token and eos is the argmax: the same as greedy
    generate's exact match, at the cost of one batched forward."""
    model.eval()
    right, total = defaultdict(int), defaultdict(int)
    for samples, batch in batches:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        ).logits
        predicted = logits[:, :-1].argmax(-1)
        targets = batch["labels"][:, 1:]
        correct = ((predicted == targets) | (targets == -100)).all(dim=1)
        for sample, ok in zip(samples, correct.tolist()):
            right[sample.kind] += ok
            total[sample.kind] += 1
    model.train()
    scores = {kind: right[kind] / total[kind] for kind in cards.QUESTION_KINDS if total[kind]}
    scores["overall"] = sum(right.values()) / max(1, sum(total.values()))
    return scores


def generate_accuracy(model: torch.nn.Module, plan: str) -> dict:
    """Exact match of plain greedy ``generate`` on held-out seeds, per number of images and per kind."""
    report = {"per_images": {}, "per_kind": {}, "per_images_and_kind": {}, "wrong_examples": []}
    right, total = defaultdict(int), defaultdict(int)
    for part in plan.split(","):
        num_images, count = (int(value) for value in part.split(":"))
        kind_right, kind_total = defaultdict(int), defaultdict(int)
        for seed in cards.evaluation_seeds(count):
            sample = cards.make_sample(seed, num_images)
            reply = cards.answer(model, sample)
            ok = reply == sample.answer
            for key in (sample.kind, "all"):
                kind_right[key] += ok
                kind_total[key] += 1
            if not ok and len(report["wrong_examples"]) < 30:
                report["wrong_examples"].append({"seed": seed, "num_images": num_images, "question": sample.question,
                                                 "expected": sample.answer, "got": reply})  # fmt: skip
        report["per_images"][str(num_images)] = {"accuracy": kind_right["all"] / count, "questions": count}
        report["per_images_and_kind"][str(num_images)] = {
            kind: round(kind_right[kind] / kind_total[kind], 4) for kind in cards.QUESTION_KINDS if kind_total[kind]
        }
        for key in kind_total:
            right[key] += kind_right[key]
            total[key] += kind_total[key]
    for kind in cards.QUESTION_KINDS:
        report["per_kind"][kind] = {"accuracy": right[kind] / max(1, total[kind]), "questions": total[kind]}
    report["overall"] = {"accuracy": right["all"] / max(1, total["all"]), "questions": total["all"]}
    return report


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlavaForConditionalGeneration

    if args.init_from is not None:
        model = cards.load_model(args.init_from)
        model.set_attn_implementation("eager")
        return model.train()
    config = cards.build_model_config(
        vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers,
        text_hidden=args.text_hidden,
        text_layers=args.text_layers,
        text_heads=args.text_heads,
        text_kv_heads=args.text_kv_heads,
        text_intermediate=args.text_intermediate,
        text_init_std=args.text_init_std,
    )
    # eager attention returns the attention weights that --attention-weight supervises; the saved config
    # and load_model use sdpa, which computes the same function
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="eager").train()


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


ACCURACY_TARGET = 0.95  # the held-out full-cache accuracy a kind needs to be worth benchmarking the cache with


def write_model_card(folder: Path, note: str = "") -> Path:
    """``README.md`` next to the checkpoint: architecture, data, seeds, training time, command and held-out
    accuracy, all read from ``config.json`` and ``training.json`` (so the card cannot drift from the record)."""
    config = json.loads((folder / "config.json").read_text())
    record = json.loads((folder / "training.json").read_text())
    text, vision, final = config["text_config"], config["vision_config"], record["final_eval"]
    size_mib = (folder / "model.safetensors").stat().st_size / 2**20
    kinds = "\n".join(
        f"| {kind} | {_percent(value['accuracy'])} | {value['questions']} |"
        for kind, value in final["per_kind"].items()
    )
    per_images = "\n".join(
        f"| {images} | {_percent(value['accuracy'])} | {value['questions']} |"
        for images, value in final["per_images"].items()
    )
    weak = {kind: value["accuracy"] for kind, value in final["per_kind"].items() if value["accuracy"] < ACCURACY_TARGET}
    if weak:
        listed = ", ".join(f"`{kind}` ({_percent(value)})" for kind, value in weak.items())
        without = [value for kind, value in final["per_kind"].items() if kind not in weak]
        mean = sum(value["accuracy"] * value["questions"] for value in without) / sum(v["questions"] for v in without)
        weak_text = (
            f"Below the {_percent(ACCURACY_TARGET)} target: {listed}. The task is shrunk honestly for the "
            f"benchmark: `mmkv bench quality` leaves these kinds out by default (`cards.BENCH_KINDS`; `--kinds` "
            f"asks them), and on the other kinds the model answers {_percent(mean)}."
        )
    else:
        weak_text = f"Every kind is at or above the {_percent(ACCURACY_TARGET)} target."
    card = f"""# cards-vlm: a {record["parameters"] / 1e6:.2f}M-parameter LLaVA trained on the cards task

Used by `mmkv bench quality --model cards-vlm` (see `docs/quality.md`); written by
`benchmarks/train_cards_vlm.py` (this card too: `--card-only` rewrites it from `training.json`).

## Architecture
`LlavaForConditionalGeneration` (transformers {record["transformers"]}), {record["parameters"]:,} parameters,
stored as bfloat16 safetensors ({size_mib:.1f} MiB):

* vision tower: CLIP, {vision["num_hidden_layers"]} layers, width {vision["hidden_size"]}, \
{vision["num_attention_heads"]} heads, {vision["image_size"]} x {vision["image_size"]} pixels in \
{vision["patch_size"]} x {vision["patch_size"]} patches: {cards.TOKENS_PER_IMAGE} image tokens per card (CLS dropped),
  features from its last layer;
* projector: LLaVA's two-layer MLP;
* decoder: Llama, {text["num_hidden_layers"]} layers, width {text["hidden_size"]}, {text["num_attention_heads"]} \
heads, {text["num_key_value_heads"]} KV heads (GQA), MLP {text["intermediate_size"]}; a word vocabulary of \
{text["vocab_size"]} tokens (`mmkv_compile.bench.cards.VOCAB`; no tokenizer files: `cards.encode` / `cards.decode`).

## Data
Synthetic, rendered with Pillow (`mmkv_compile/bench/cards.py`): each prompt shows N cards ("image k : <image>*16"),
a card being a coloured 16 x 16 square (8 colours) with a black seven-segment digit, jittered by a pixel, with pixel
noise; one text fact ("the code is 7 .") sits before a random card. Questions: `digit_by_index` ("what digit is
in image 7"), `digit_by_colour` (the one card of a colour), `compare` ("is the digit in image 3 larger than in
image 9"), `count` ("how many cards are blue") and `text_needle` ("what is the code"); answers are one word and
eos. Training seeds start at `cards.TRAIN_SEED_OFFSET` (1,000,000); evaluation seeds lie below it, so no
held-out prompt was ever trained on. Weights are initialised from `torch.manual_seed({record["arguments"]["seed"]})`.

## Training
`{record["command"]}` (`--out` defaults to this folder): {record["steps"]} steps of \
{record["arguments"]["batch"]} prompts, each followed by {record["arguments"]["questions"]} question/answer pairs,
AdamW, phases (`STEPS:KINDS:IMAGES`) `{record["arguments"]["schedule"]}`, with the helper losses the script's
docstring lists (thrown away after training). {record["train_wall_seconds"] / 60:.0f} minutes of training on \
{record["machine"]} (torch {record["torch"]}, {record["date"]}); the numbers of each periodic check are in
`training.json` (`history`).

## Accuracy (held out, full cache)
The saved bfloat16 checkpoint, loaded back in float32, answering with plain greedy `generate` (question in the
prompt, nothing compressed): **{_percent(final["overall"]["accuracy"])}** of {final["overall"]["questions"]} \
questions (seeds from 0; the question kind chosen by the seed).

| kind | accuracy | questions |
|---|---|---|
{kinds}

| images per prompt | accuracy | questions |
|---|---|---|
{per_images}

{weak_text}

{note}

## Limits
A toy: it knows only this vocabulary and these cards, and was trained on at most {cards.MAX_IMAGES} images
(positions up to {text["max_position_embeddings"]}). Its attention was partly supervised (see the training
script), so which tokens it attends to is more regular than a naturally trained VLM's; methods that score
tokens by attention may find this model easier than a real one.
"""
    path = folder / "README.md"
    path.write_text(card)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.card_only:
        print(f"wrote {write_model_card(args.out, args.card_note)}")
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data_rng = random.Random(args.seed)
    phases = parse_schedule(args.schedule)
    phase_of_step = [phase for phase in phases for _ in range(phase.steps)]
    total_steps = len(phase_of_step) if args.steps is None else min(args.steps, len(phase_of_step))

    model = build_model(args)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"model: {parameters:,} parameters; {total_steps} steps in {len(phases)} phases", flush=True)
    hidden = model.config.text_config.hidden_size
    tap = ProjectorTap(model)
    # the head and the probe read normalized features, so they give no reason to grow the image tokens' scale
    card_head = torch.nn.Sequential(
        torch.nn.LayerNorm(hidden, elementwise_affine=False), torch.nn.Linear(hidden, 10 + len(cards.COLOURS))
    )
    read_head = torch.nn.Sequential(
        torch.nn.LayerNorm(hidden, elementwise_affine=False), torch.nn.Linear(hidden, 10 + len(cards.COLOURS))
    )
    index_probe = torch.nn.Sequential(
        torch.nn.LayerNorm(hidden, elementwise_affine=False), torch.nn.Linear(hidden, cards.MAX_IMAGES)
    )
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *card_head.parameters(), *read_head.parameters(), *index_probe.parameters()],
        lr=args.lr,
        betas=(0.9, 0.98),
        weight_decay=args.weight_decay,
    )
    held_out = {}  # per phase image range
    history = []
    started = time.time()
    running = defaultdict(float)
    for step in range(total_steps):
        phase = phase_of_step[step]
        num_images = data_rng.randint(phase.min_images, phase.max_images)
        first_seed = cards.TRAIN_SEED_OFFSET + args.seed * 100_000_000 + step * args.batch
        batch = collate([cards.make_training_sequence(first_seed + i, num_images, args.questions, phase.kinds)
                         for i in range(args.batch)])  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, args)
        outputs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            output_hidden_states=True,
            output_attentions=args.attention_weight > 0 or args.count_attention_weight > 0,
        )
        loss = answer_loss(outputs.logits, batch["labels"])
        attention_loss = torch.zeros(())
        if args.attention_weight > 0:
            attention_loss = supervised_attention_loss(outputs.attentions[args.attention_layer], batch["targets"])
        count_loss = torch.zeros(())
        if args.count_attention_weight > 0:
            count_loss = uniform_attention_loss(outputs.attentions[args.attention_layer], batch["count_targets"])

        # every image token names its card's digit and colour: as the projector gives it to the decoder, and
        # where the supervised head reads it
        is_image = batch["input_ids"] == cards.IMAGE_TOKEN_ID  # row-major order = the order of the cards
        digits = batch["card_digits"].repeat_interleave(cards.TOKENS_PER_IMAGE)
        colours = batch["card_colours"].repeat_interleave(cards.TOKENS_PER_IMAGE)
        card_loss = torch.zeros(())
        for head, tokens in ((card_head, tap.features.flatten(0, 1)),
                             (read_head, outputs.hidden_states[args.attention_layer][is_image])):  # fmt: skip
            card_logits = head(tokens)
            card_loss = card_loss + F.cross_entropy(card_logits[:, :10], digits)
            card_loss = card_loss + F.cross_entropy(card_logits[:, 10:], colours)
        middle = outputs.hidden_states[len(outputs.hidden_states) // 2][is_image]
        numbers = batch["card_numbers"].repeat_interleave(cards.TOKENS_PER_IMAGE)
        index_loss = F.cross_entropy(index_probe(middle), numbers)
        text_rms = model.get_input_embeddings().weight.detach().pow(2).mean().sqrt()
        scale_loss = (tap.features.pow(2).mean().sqrt().log() - text_rms.log()).pow(2)

        total = loss + args.aux_weight * card_loss + args.index_probe_weight * index_loss
        total = total + args.scale_weight * scale_loss + args.attention_weight * attention_loss
        total = total + args.count_attention_weight * count_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        for name, value in (("answer", loss), ("card", card_loss), ("index", index_loss), ("scale", scale_loss),
                            ("attention", attention_loss), ("count", count_loss)):  # fmt: skip
            running[name] += value.item()
        running["steps"] += 1

        if (step + 1) % args.log_every == 0:
            elapsed = time.time() - started
            means = "  ".join(f"{name} {running[name] / running['steps']:.4f}"
                              for name in ("answer", "card", "index", "scale", "attention", "count"))  # fmt: skip
            print(f"step {step + 1:5d}  {means}  lr {learning_rate(step, total_steps, args):.2e}  images {num_images}"
                  f"  {elapsed / (step + 1):.2f} s/step  {elapsed / 60:.1f} min", flush=True)  # fmt: skip
            running.clear()
        if (step + 1) % args.eval_every == 0 or step + 1 == total_steps:
            image_counts = (phase.min_images, (phase.min_images + phase.max_images) // 2, phase.max_images)
            if image_counts not in held_out:
                held_out[image_counts] = held_out_batches(args.eval_count, image_counts, batch=16)
            scores = teacher_forced_accuracy(model, held_out[image_counts])
            history.append({"step": step + 1, "minutes": round((time.time() - started) / 60, 2),
                            "images": list(image_counts), **{k: round(v, 4) for k, v in scores.items()}})  # fmt: skip
            print(f"eval step {step + 1} ({'/'.join(map(str, image_counts))} images): "
                  + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)  # fmt: skip
    train_seconds = time.time() - started

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.pad_token_id = cards.PAD_TOKEN_ID
    model.generation_config.bos_token_id = cards.BOS_TOKEN_ID
    model.generation_config.eos_token_id = cards.EOS_TOKEN_ID
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)

    # Score what ships: the bfloat16 checkpoint, loaded back in float32, answered by plain generate.
    eval_started = time.time()
    final = generate_accuracy(cards.load_model(args.out), args.final_eval)
    print(f"final (generate, held-out): overall {final['overall']['accuracy']:.4f}  "
          + "  ".join(f"{kind} {value['accuracy']:.3f}" for kind, value in final["per_kind"].items()) + "  "
          + "  ".join(f"{n} images {value['accuracy']:.3f}" for n, value in final["per_images"].items()),
          flush=True)  # fmt: skip
    record = {
        "command": "python benchmarks/train_cards_vlm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "steps": total_steps,
        "parameters": parameters,
        "train_wall_seconds": round(train_seconds, 1),
        "eval_wall_seconds": round(time.time() - eval_started, 1),
        "final_eval": final,
        "history": history,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    write_model_card(args.out)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
