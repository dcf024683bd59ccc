"""The "cards" task: a tiny trained vision-language model and synthetic multi-image questions it answers.

Each prompt shows ``num_images`` (2-24) small pictures ("cards"). A card is a 16 x 16 coloured square with
a black seven-segment digit on it; the vision tower turns it into ``TOKENS_PER_IMAGE`` (16) image tokens.
One text fact ("the code is 7 .") sits just before a random image. The prompt ends with one question about
the images or the fact, whose last word is its key (the image number, the colour or the fact's name); the
answer is one word followed by eos::

    <bos> image 1 : <image>*16 image 2 : <image>*16 the code is 4 . image 3 : <image>*16 ... image 16 : <image>*16
    what digit is in image 7                                        -> 3 <eos>

Question kinds (``QUESTION_KINDS``):

``digit_by_index``   "what digit is in image 7"                            -> "3"
``digit_by_colour``  "what digit is on the card that is red" (one red)     -> "3"
``compare``          "is the digit in image 3 larger than in image 9"      -> "yes" / "no"
``count``            "how many cards are blue"                             -> "4"
``text_needle``      "what is the code"                                    -> "7"

So a KV-cache method that evicts the asked-about image's tokens (or the fact's tokens) makes the model fail.
Everything is deterministic given the seed: ``random.Random(seed)`` picks the scene and the question,
``numpy.random.default_rng(seed)`` the pixel noise. Evaluation seeds (below ``TRAIN_SEED_OFFSET``) never
meet the training seeds (from ``TRAIN_SEED_OFFSET`` up).

The model (``load_model``) is a ``LlavaForConditionalGeneration`` (CLIP tower, projector, Llama decoder)
trained by ``benchmarks/train_cards_vlm.py``; its checkpoint ships in ``mmkv_compile/assets/cards_vlm``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# --- vocabulary -----------------------------------------------------------------------------------

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
IMAGE_TOKEN = "<image>"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 220),
    "yellow": (235, 210, 45),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
    "cyan": (40, 200, 215),
}
FACT_NAMES = ("code",)
MAX_IMAGES = 24
MIN_IMAGES = max(2, len(FACT_NAMES))  # two cards to compare; each fact sits before its own image

_WORDS = (
    [str(number) for number in range(MAX_IMAGES + 1)]  # digits, image numbers and counts are one token each
    + list(COLOURS)
    + list(FACT_NAMES)
    + ["image", ":", ".", "?", "the", "is", "what", "digit", "in", "on", "card", "cards"]
    + ["larger", "than", "yes", "no", "how", "many", "are", "that"]
)
VOCAB: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, *_WORDS)
TOKEN_IDS: dict[str, int] = {word: index for index, word in enumerate(VOCAB)}
PAD_TOKEN_ID = TOKEN_IDS[PAD_TOKEN]
BOS_TOKEN_ID = TOKEN_IDS[BOS_TOKEN]
EOS_TOKEN_ID = TOKEN_IDS[EOS_TOKEN]
IMAGE_TOKEN_ID = TOKEN_IDS[IMAGE_TOKEN]
SPECIAL_TOKEN_IDS = frozenset({PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, IMAGE_TOKEN_ID})


def encode(text: str) -> list[int]:
    """Token ids of whitespace-separated words (special tokens such as ``<bos>`` are words too).

    Raises ``ValueError`` for a word outside ``VOCAB``.
    """
    ids = []
    for word in text.split():
        if word not in TOKEN_IDS:
            raise ValueError(f"word {word!r} is not in the cards vocabulary")
        ids.append(TOKEN_IDS[word])
    return ids


def decode(ids: list[int] | torch.Tensor, skip_special: bool = True) -> str:
    """Words of token ids joined by spaces; pad, bos, eos and image tokens are left out unless ``skip_special``
    is false. Ids outside the vocabulary decode as ``<unk>``."""
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    words = []
    for token_id in ids:
        if skip_special and token_id in SPECIAL_TOKEN_IDS:
            continue
        words.append(VOCAB[token_id] if 0 <= token_id < len(VOCAB) else "<unk>")
    return " ".join(words)


# --- images ---------------------------------------------------------------------------------------

IMAGE_SIZE = 16
PATCH_SIZE = 4
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # the "default" feature strategy drops CLS
PIXEL_MEAN = 0.5  # pixels are scaled to [0, 1], then (x - mean) / std, so they lie in [-1, 1]
PIXEL_STD = 0.5

# Seven-segment digits: which segments (a top, b top right, c bottom right, d bottom, e bottom left,
# f top left, g middle) are lit. Drawn with rectangles, so no font (and no font version) is involved.
_SEGMENTS_OF_DIGIT = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}  # fmt: skip
# Inclusive rectangles (x0, y0, x1, y1) of each segment for a glyph 8 wide and 12 tall at (0, 0).
_SEGMENT_BOXES = {
    "a": (0, 0, 7, 1), "b": (6, 0, 7, 6), "c": (6, 5, 7, 11), "d": (0, 10, 7, 11),
    "e": (0, 5, 1, 11), "f": (0, 0, 1, 6), "g": (0, 5, 7, 6),
}  # fmt: skip
GLYPH_LEFT, GLYPH_TOP = 4, 2  # the glyph's corner, centred in a 16 x 16 card; a jitter of one pixel keeps it inside
PIXEL_NOISE = 12  # largest pixel noise (of 255), so no two cards give identical image tokens


@dataclass(frozen=True)
class Card:
    """One picture: its background colour, its digit, and the glyph's offset (pixels) from the centre."""

    colour: str
    digit: int
    shift_x: int = 0
    shift_y: int = 0


def render_card(card: Card, noise_rng: np.random.Generator | None = None) -> np.ndarray:
    """The card as an ``[IMAGE_SIZE, IMAGE_SIZE, 3]`` uint8 RGB array; ``noise_rng`` adds mild pixel noise."""
    from PIL import Image, ImageDraw  # Pillow only where cards are drawn (the text benchmark needs none)

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS[card.colour])
    draw = ImageDraw.Draw(image)
    left, top = GLYPH_LEFT + card.shift_x, GLYPH_TOP + card.shift_y
    for segment in _SEGMENTS_OF_DIGIT[card.digit]:
        x0, y0, x1, y1 = _SEGMENT_BOXES[segment]
        draw.rectangle((left + x0, top + y0, left + x1, top + y1), fill=(0, 0, 0))
    pixels = np.asarray(image, dtype=np.int16)
    if noise_rng is not None:
        pixels = pixels + noise_rng.integers(-PIXEL_NOISE, PIXEL_NOISE + 1, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def pixels_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` arrays to the model's normalized ``[N, 3, H, W]`` float tensor."""
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (stacked - PIXEL_MEAN) / PIXEL_STD


# --- scenes, questions, prompts -------------------------------------------------------------------

QUESTION_KINDS: tuple[str, ...] = ("digit_by_index", "digit_by_colour", "compare", "count", "text_needle")
# What ``mmkv bench quality`` asks by default: every kind but ``count``, which the shipped model answers only
# about half the time with the full cache (its model card), so it would measure the model, not the cache.
BENCH_KINDS: tuple[str, ...] = ("digit_by_index", "digit_by_colour", "compare", "text_needle")
TRAIN_SEED_OFFSET = 1_000_000


@dataclass
class Scene:
    """What one prompt shows: the cards in order, and the text facts with the image they are placed before
    (``fact_slots[name] = k`` puts the fact just before image ``k + 1``)."""

    cards: list[Card]
    facts: dict[str, int]
    fact_slots: dict[str, int]


@dataclass
class Question:
    """One question about a scene: its words, the answer word, and the images (1-based) the answer needs."""

    kind: str
    text: str
    answer: str
    relevant_images: tuple[int, ...]


def make_scene(rng: random.Random, num_images: int, needs_unique_colour: bool = False) -> Scene:
    """Random cards (at least two distinct digits) and facts; with ``needs_unique_colour`` some colour is on exactly
    one card. Scenes that break a rule are redrawn from the same ``rng``."""
    if not MIN_IMAGES <= num_images <= MAX_IMAGES:
        raise ValueError(f"num_images must be in [{MIN_IMAGES}, {MAX_IMAGES}], got {num_images}")
    colours = list(COLOURS)
    while True:
        cards = [
            Card(rng.choice(colours), rng.randrange(10), rng.randint(-1, 1), rng.randint(-1, 1))
            for _ in range(num_images)
        ]
        distinct_digits = len({card.digit for card in cards}) >= 2  # so "compare" always has a pair
        if distinct_digits and (not needs_unique_colour or _unique_colours(cards)):
            break
    facts = {name: rng.randrange(10) for name in FACT_NAMES}
    slots = rng.sample(range(num_images), len(FACT_NAMES))
    return Scene(cards, facts, dict(zip(FACT_NAMES, slots)))


def _unique_colours(cards: list[Card]) -> list[str]:
    """Colours (in ``COLOURS`` order) that exactly one card has."""
    return [colour for colour in COLOURS if sum(card.colour == colour for card in cards) == 1]


def make_question(rng: random.Random, scene: Scene, kind: str) -> Question:
    """A question of ``kind`` about ``scene``, with its answer computed from the scene."""
    cards = scene.cards
    if kind == "digit_by_index":
        number = rng.randint(1, len(cards))
        return Question(kind, f"what digit is in image {number}", str(cards[number - 1].digit), (number,))
    if kind == "digit_by_colour":
        candidates = _unique_colours(cards)
        if not candidates:
            raise ValueError("digit_by_colour needs a colour that exactly one card has")
        colour = rng.choice(candidates)
        number = next(index + 1 for index, card in enumerate(cards) if card.colour == colour)
        return Question(kind, f"what digit is on the card that is {colour}", str(cards[number - 1].digit), (number,))
    if kind == "compare":
        pairs = [(a, b) for a in range(len(cards)) for b in range(len(cards)) if cards[a].digit != cards[b].digit]
        if not pairs:
            raise ValueError("compare needs two cards with different digits")
        first, second = rng.choice(pairs)
        larger = "yes" if cards[first].digit > cards[second].digit else "no"
        text = f"is the digit in image {first + 1} larger than in image {second + 1}"
        return Question(kind, text, larger, (first + 1, second + 1))
    if kind == "count":
        colour = rng.choice(list(COLOURS))
        numbers = tuple(index + 1 for index, card in enumerate(cards) if card.colour == colour)
        return Question(kind, f"how many cards are {colour}", str(len(numbers)), tuple(range(1, len(cards) + 1)))
    if kind == "text_needle":
        name = rng.choice(FACT_NAMES)
        return Question(kind, f"what is the {name}", str(scene.facts[name]), ())
    raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


def context_words(scene: Scene) -> tuple[list[str], list[tuple[int, int]], dict[str, tuple[int, int]]]:
    """The prompt before the question, as words; with each image's token span and each fact's span
    (start, end exclusive), counted in tokens from the start of the prompt (``<bos>`` is token 0)."""
    words = [BOS_TOKEN]
    image_spans, fact_spans = [], {}
    slot_to_fact = {slot: name for name, slot in scene.fact_slots.items()}
    for index in range(len(scene.cards)):
        if index in slot_to_fact:
            name = slot_to_fact[index]
            sentence = f"the {name} is {scene.facts[name]} .".split()
            fact_spans[name] = (len(words), len(words) + len(sentence))
            words += sentence
        words += ["image", str(index + 1), ":"]
        image_spans.append((len(words), len(words) + TOKENS_PER_IMAGE))
        words += [IMAGE_TOKEN] * TOKENS_PER_IMAGE
    return words, image_spans, fact_spans


def scene_pixels(scene: Scene, noise_rng: np.random.Generator) -> torch.Tensor:
    """The scene's cards as the model's normalized ``[N, 3, H, W]`` pixel tensor."""
    return pixels_to_tensor([render_card(card, noise_rng) for card in scene.cards])


@dataclass
class CardsSample:
    """One held-out question: the prompt (up to and including the question) and the expected answer.

    ``image_spans[i]`` is the (start, end) token range of image ``i + 1`` in ``input_ids``; ``fact_spans`` the
    same for each fact sentence; ``question_start`` where the question's first word sits. ``relevant_images``
    are the 1-based images the answer depends on (all of them for ``count``, none for ``text_needle``).
    """

    input_ids: torch.LongTensor
    pixel_values: torch.FloatTensor
    answer: str
    answer_ids: list[int]
    kind: str
    num_images: int
    image_token_count: int
    question: str = ""
    cards: list[Card] = field(default_factory=list)
    facts: dict[str, int] = field(default_factory=dict)
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    fact_spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    question_start: int = 0
    relevant_images: tuple[int, ...] = ()
    seed: int = 0


def make_sample(seed: int, num_images: int = 16, kind: str | None = None) -> CardsSample:
    """The prompt and answer of ``seed`` (deterministic). ``kind=None`` lets the seed choose the question kind."""
    rng = random.Random(seed)
    if kind is None:
        kind = rng.choice(QUESTION_KINDS)
    elif kind not in QUESTION_KINDS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")
    scene = make_scene(rng, num_images, needs_unique_colour=kind == "digit_by_colour")
    question = make_question(rng, scene, kind)
    words, image_spans, fact_spans = context_words(scene)
    question_start = len(words)
    input_ids = torch.tensor([encode(" ".join(words + question.text.split()))], dtype=torch.long)
    return CardsSample(
        input_ids=input_ids,
        pixel_values=scene_pixels(scene, np.random.default_rng(seed)),
        answer=question.answer,
        answer_ids=encode(question.answer) + [EOS_TOKEN_ID],
        kind=kind,
        num_images=num_images,
        image_token_count=num_images * TOKENS_PER_IMAGE,
        question=question.text,
        cards=scene.cards,
        facts=scene.facts,
        image_spans=image_spans,
        fact_spans=fact_spans,
        question_start=question_start,
        relevant_images=question.relevant_images,
        seed=seed,
    )


@dataclass
class TrainingSequence:
    """A training prompt with its question/answer pairs: ``labels`` is -100 except on answer and eos tokens."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor
    cards: list[Card]
    # (position of a question's last token, the positions its answer must be read from first, and second):
    # the image asked about (for "compare" the last image named, then the first), or the fact's value.
    attention_targets: list[tuple[int, list[int], list[int]]] = field(default_factory=list)
    # (position of a "count" question's last token, every image token's position): where counting can read
    # the share of the cards that have the colour
    count_targets: list[tuple[int, list[int]]] = field(default_factory=list)


def make_training_sequence(
    seed: int, num_images: int, questions: int = 1, kinds: tuple[str, ...] = QUESTION_KINDS
) -> TrainingSequence:
    """A training prompt followed by ``questions`` distinct question/answer pairs, each answer ending in eos.
    Kinds take turns in an order the seed shuffles, so the first five are of distinct kinds. The first question
    sits exactly where an evaluation prompt puts its only one; the others add supervision (they also see the
    earlier questions and answers)."""
    if seed < TRAIN_SEED_OFFSET:
        raise ValueError(f"training seeds start at TRAIN_SEED_OFFSET={TRAIN_SEED_OFFSET}, got {seed}")
    rng = random.Random(seed)
    order = rng.sample(kinds, len(kinds))
    asked_kinds = [order[index % len(order)] for index in range(questions)]
    scene = make_scene(rng, num_images, needs_unique_colour="digit_by_colour" in asked_kinds)
    words, image_spans, fact_spans = context_words(scene)
    input_ids = encode(" ".join(words))
    labels = [-100] * len(input_ids)
    attention_targets, count_targets = [], []
    asked = set()
    for kind in asked_kinds:
        for _ in range(10):  # a repeated question would only teach copying the earlier answer
            question = make_question(rng, scene, kind)
            if question.text not in asked:
                break
        else:
            continue
        asked.add(question.text)
        question_ids = encode(question.text)
        answer_ids = encode(question.answer) + [EOS_TOKEN_ID]
        last_question_token = len(input_ids) + len(question_ids) - 1
        spans = [list(range(*image_spans[number - 1])) for number in question.relevant_images]
        if kind in ("digit_by_index", "digit_by_colour"):
            attention_targets.append((last_question_token, spans[0], []))
        elif kind == "compare":
            attention_targets.append((last_question_token, spans[1], spans[0]))
        elif kind == "text_needle":
            value_position = fact_spans[question.text.split()[-1]][0] + 3  # "the code is 7 ."
            attention_targets.append((last_question_token, [value_position], []))
        elif kind == "count":
            count_targets.append((last_question_token, [position for span in spans for position in span]))
        input_ids += question_ids + answer_ids
        labels += [-100] * len(question_ids) + answer_ids
    pixels = scene_pixels(scene, np.random.default_rng(seed))
    return TrainingSequence(input_ids, labels, pixels, scene.cards, attention_targets, count_targets)


def evaluation_seeds(count: int, seed: int = 0) -> list[int]:
    """``count`` held-out seeds from ``seed`` on; they never reach ``TRAIN_SEED_OFFSET``."""
    if seed < 0 or seed + count > TRAIN_SEED_OFFSET:
        raise ValueError(f"evaluation seeds must lie in [0, {TRAIN_SEED_OFFSET})")
    return list(range(seed, seed + count))


# --- the model ------------------------------------------------------------------------------------


def build_model_config(
    vision_hidden: int = 128,
    vision_layers: int = 2,
    vision_heads: int = 4,
    text_hidden: int = 128,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 384,
    max_positions: int = 1024,
    text_init_std: float = 0.02,
):
    """The ``LlavaConfig`` of the cards model (CLIP tower on 16 x 16 cards, patch 4; GQA Llama decoder).
    The defaults are the shipped model's sizes (and ``benchmarks/train_cards_vlm.py``'s defaults)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        initializer_range=text_init_std,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=TOKENS_PER_IMAGE,
        vision_feature_layer=-1,  # the last CLIP layer; the default -2 would leave a 2-layer tower's last unused
        vision_feature_select_strategy="default",
    )


def default_checkpoint() -> Path:
    """The shipped checkpoint folder, ``mmkv_compile/assets/cards_vlm``."""
    return Path(__file__).resolve().parent.parent / "assets" / "cards_vlm"


def is_cards_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a cards model: a LLaVA config with this vocabulary and image token."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text())
    text = config.get("text_config") or {}
    return (
        config.get("model_type") == "llava"
        and config.get("image_token_index", config.get("image_token_id")) == IMAGE_TOKEN_ID
        and text.get("vocab_size") == len(VOCAB)
    )


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The trained cards model (``default_checkpoint()`` unless ``path``), in eval mode with sdpa attention."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        str(path or default_checkpoint()), dtype=dtype, attn_implementation="sdpa"
    )
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    model.generation_config.bos_token_id = BOS_TOKEN_ID
    return model.eval()


def answer(model: torch.nn.Module, sample: CardsSample, max_new_tokens: int = 4) -> str:
    """The model's greedy answer to ``sample`` (plain ``generate``, full cache), decoded, eos stripped."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        output = model.generate(
            input_ids=sample.input_ids,
            attention_mask=torch.ones_like(sample.input_ids),
            pixel_values=sample.pixel_values.to(dtype),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=PAD_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
        )
    new_ids = output[0, sample.input_ids.shape[1] :].tolist()
    if EOS_TOKEN_ID in new_ids:
        new_ids = new_ids[: new_ids.index(EOS_TOKEN_ID)]
    return decode(new_ids)
