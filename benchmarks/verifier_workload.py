"""What bench_verifier.py runs on, and the naive verifier it checks and times ours against.

Inputs: caption-like sentences that use the entity vocabulary (the tokenizer's training text
and the B x T responses) and a random transformers CLIP of fixed sizes. Reference: a naive
per-sample loop (decode, split into words, look up surface forms, one CLIP text forward per
mention), whose mentions and scores ours must reproduce.
"""
from __future__ import annotations

import pathlib
import re
import time

import numpy as np

import common

TEMPLATE = "a photo of a {}."
WORD_RE = re.compile(r"[a-z0-9]+")

CLIP_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                 max_position_embeddings=77)
CLIP_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   image_size=112, patch_size=14)
CLIP_PROJECTION = 512

# Frequent objects of photo descriptions; the rest of the mentions are drawn from the whole vocabulary.
COMMON_OBJECTS = (
    "person", "man", "woman", "people", "child", "dog", "cat", "car", "table", "chair", "cup", "bottle",
    "plate", "fork", "knife", "bowl", "pizza", "hot dog", "teddy bear", "tree", "building", "bus", "truck",
    "bicycle", "umbrella", "bench", "clock", "window", "sign", "traffic light", "laptop", "book", "vase",
    "couch", "bed", "tv", "horse", "sheep", "kite", "boat", "bird", "wine glass", "sandwich", "cake",
    "banana", "apple", "backpack", "handbag", "cell phone", "toilet", "sink", "refrigerator", "oven",
)
OPENERS = ("The image shows", "In this picture there is", "We can see", "In the foreground there is",
           "Next to it there is", "The scene also includes", "On the left side there is",
           "In the background there is", "Nearby, there is", "The photo captures")
RELATIONS = ("next to", "on top of", "near", "behind", "in front of", "beside", "under", "and", "with",
             "close to")
ADJECTIVES = ("", "", "", "red ", "large ", "small ", "wooden ", "bright ", "old ", "colorful ", "tall ")
DETERMINERS = ("a", "the", "a", "two", "several", "some", "one")
FILLERS = ("The lighting suggests that the photo was taken during the day.",
           "The overall atmosphere of the scene is calm and pleasant.",
           "It appears to be a busy afternoon.", "The colors are bright and vivid.",
           "This creates a cozy and inviting setting.",
           "The composition draws attention to the center of the frame.")


# ----------------------------------------------------------------------------- data

def caption_sentence(rng: np.random.RandomState, common_forms: list[str], all_forms: tuple[str, ...]) -> str:
    """One caption-like sentence with 1-3 entity mentions, or a filler sentence without any."""
    if rng.rand() < 0.3:
        return FILLERS[rng.randint(len(FILLERS))]

    def obj() -> str:
        form = common_forms[rng.randint(len(common_forms))] if rng.rand() < 0.6 else all_forms[rng.randint(len(all_forms))]
        return f"{DETERMINERS[rng.randint(len(DETERMINERS))]} {ADJECTIVES[rng.randint(len(ADJECTIVES))]}{form}"

    words = [OPENERS[rng.randint(len(OPENERS))], obj()]
    for _ in range(rng.randint(0, 3)):
        words += [RELATIONS[rng.randint(len(RELATIONS))], obj()]
    return " ".join(words) + rng.choice([".", ".", ".", ",", "!"])


def training_corpus(vocab, n_sentences: int, seed: int) -> list[str]:
    """Caption-like sentences for the tokenizer (one document of ~5 sentences per line)."""
    rng = np.random.RandomState(seed)
    common_forms = [f for f in COMMON_OBJECTS if vocab.entity_id(f) >= 0]
    sentences = [caption_sentence(rng, common_forms, vocab.surface_forms) for _ in range(n_sentences)]
    return [" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5)]


def make_responses(tokenizer, vocab, batch: int, seq: int, seed: int):
    """Encoded responses: ids [B, T] int32 (EOS after the last sentence, then pad), mask [B, T]
    int32 (1 up to and including EOS). Each row's length is drawn in [0.8 T, T]."""
    rng = np.random.RandomState(seed)
    common_forms = [f for f in COMMON_OBJECTS if vocab.entity_id(f) >= 0]
    ids = np.full((batch, seq), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        limit = int(rng.randint(int(0.8 * seq), seq + 1)) - 1  # room for EOS
        row: list[int] = []
        while True:
            sentence = caption_sentence(rng, common_forms, vocab.surface_forms)
            text = tokenizer.decode(row) + " " + sentence if row else sentence
            cand = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(cand) > limit:
                break
            row = cand
        row = row + [tokenizer.eos_token_id]
        ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
    return ids, mask


def save_random_clip(folder: pathlib.Path, vocab_size: int, eos_token_id: int, seed: int = 0) -> int:
    """Random transformers CLIP (sizes above), norms and biases perturbed; returns its parameter count."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab_size, eos_token_id=eos_token_id, **CLIP_TEXT),
                     vision_config=dict(**CLIP_VISION), projection_dim=CLIP_PROJECTION)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- naive baseline

class NaiveVerifier:
    """Per-sample verifier: decode, word-tokenize, look up, one CLIP text forward per mention."""

    def __init__(self, hf_clip, tokenizer, surface_forms, clip_eos: int, template: str = TEMPLATE):
        self.hf, self.tok, self.eos, self.template = hf_clip, tokenizer, clip_eos, template
        self.forms = set(surface_forms)
        self.max_words = max(len(WORD_RE.findall(f)) for f in surface_forms)

    def mentions(self, text: str) -> list[str]:
        """Surface forms in `text`, left to right, longest match first at each word."""
        text = text.lower()
        words = [m.span() for m in WORD_RE.finditer(text)]
        out, i = [], 0
        while i < len(words):
            for n in range(min(self.max_words, len(words) - i), 0, -1):
                form = text[words[i][0]:words[i + n - 1][1]]
                if form in self.forms:
                    out.append(form)
                    i += n
                    break
            else:
                i += 1
        return out

    def _features(self, out):
        return getattr(out, "pooler_output", out)[0]

    def image_embedding(self, pixels: np.ndarray):
        """Normalised embedding [D] of one image [3, H, W]."""
        import torch

        with torch.no_grad():
            v = self._features(self.hf.get_image_features(pixel_values=torch.from_numpy(pixels[None])))
        return v / v.norm()

    def score_row(self, ids: np.ndarray, n: int, img) -> list[tuple[str, float]]:
        """[(surface form, 100 * cos)] for the first n tokens of one response."""
        import torch

        text = self.tok.decode(ids[:n].tolist(), skip_special_tokens=True)
        out = []
        for form in self.mentions(text):
            t_ids = list(self.tok(self.template.format(form))["input_ids"])
            if t_ids[-1] != self.eos:
                t_ids.append(self.eos)
            with torch.no_grad():
                t = self._features(self.hf.get_text_features(input_ids=torch.tensor([t_ids])))
            out.append((form, float(100.0 * (t @ img) / t.norm())))
        return out

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pixels: np.ndarray, rows: int):
        """Scores of the first `rows` responses: (list per row of [(form, score)], seconds in
        image forwards, seconds in the rest)."""
        results, t_img, t_text = [], 0.0, 0.0
        for b in range(rows):
            t0 = time.perf_counter()
            img = self.image_embedding(pixels[b])
            t1 = time.perf_counter()
            results.append(self.score_row(ids[b], int(mask[b].sum()), img))
            t_img += t1 - t0
            t_text += time.perf_counter() - t1
        return results, t_img, t_text


def pick_torch_threads(naive: NaiveVerifier, ids: np.ndarray, n: int, pixels: np.ndarray) -> int:
    """1 or all cores, whichever runs the naive loop on one response faster (on a loaded
    machine several torch threads can be many times slower than one)."""
    import torch

    best, best_s = 1, float("inf")
    for threads in sorted({1, common.cpu_count()}):
        torch.set_num_threads(threads)
        naive.score_row(ids, n, naive.image_embedding(pixels))  # warm-up
        t0 = time.perf_counter()
        naive.score_row(ids, n, naive.image_embedding(pixels))
        elapsed = time.perf_counter() - t0
        if elapsed < best_s:
            best, best_s = threads, elapsed
    return best


def ours_as_lists(entity_ids: np.ndarray, scores: np.ndarray, surface_forms) -> list[list[tuple[str, float]]]:
    """Our [B, T] outputs as [(form, score)] per row, in token order."""
    return [[(surface_forms[e], float(s)) for e, s in zip(ent_row[ent_row >= 0], sc_row[ent_row >= 0])]
            for ent_row, sc_row in zip(entity_ids, scores)]


def compare(ours: list, naive: list) -> tuple[int, int, float]:
    """(rows whose mention lists differ, mentions compared, max |score diff| over matching rows)."""
    bad, n, worst = 0, 0, 0.0
    for o, r in zip(ours, naive):
        if [f for f, _ in o] != [f for f, _ in r]:
            bad += 1
            continue
        n += len(o)
        if o:
            worst = max(worst, max(abs(a - b) for (_, a), (_, b) in zip(o, r)))
    return bad, n, worst
