"""Generate responses for an image set and measure them: CHAIR, and the verifier score and
FiSAO reward of every object mention (the paper's Figures 1 and 4).

Evaluation sets are lists of batches: {'input_ids', 'attention_mask', image inputs,
'image_ids' [B], 'gt_objects' (list of sets of CHAIR node words)}; a batch may be padded with
copies of its last row, whose results are dropped (only the first len(image_ids) rows count).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

import jax
import numpy as np

from fisao_jax import hosts
from fisao_jax.eval import chair as chair_lib
from fisao_jax.rewards.entities import EntityVocab
from fisao_jax.rewards.reward import RewardParams, score_reward
from fisao_jax.rewards.verifier import Verifier, VerifierState


@dataclasses.dataclass
class Generations:
    """Decoded responses and their object mentions (host-side lists)."""

    image_ids: list
    texts: list[str]
    gt_objects: list[set]
    mention_forms: list[list[str]]     # surface forms found by the span finder, per response
    mention_scores: list[list[float]]  # their verifier scores (100 * cos)


def generate(rollout_fn: Callable, params: Any, verifier: Verifier, vstate: VerifierState, vocab: EntityVocab,
             tokenizer, batches: Iterable[dict], key: jax.Array, put_batch: Callable[[dict], dict],
             progress: bool = False, desc: str = "generate") -> Generations:
    """Run `rollout_fn(params, batch, key)` over `batches` (placed by `put_batch`), decode,
    find mentions and score them."""
    out = Generations([], [], [], [], [])
    batches = list(batches)
    it = batches
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not hosts.is_primary())
    for i, b in enumerate(it):
        dev = put_batch(b)
        roll = rollout_fn(params, dev, jax.random.fold_in(key, i))
        found = verifier.verify_jit(vstate, roll.tokens, roll.mask, dev["pixel_values"])
        # every process decodes every row: the metrics need them all, and they are cheap next to generation
        toks, mask, ent, scores = hosts.gather((roll.tokens, roll.mask, found.entity_id, found.scores))
        n = len(b["image_ids"])
        for r in range(n):
            length = int(mask[r].sum())
            out.texts.append(tokenizer.decode(toks[r, :length].tolist(), skip_special_tokens=True).strip())
            pos = np.flatnonzero(ent[r] >= 0)
            out.mention_forms.append([vocab.surface_forms[ent[r, p]] for p in pos])
            out.mention_scores.append([float(scores[r, p]) for p in pos])
        out.image_ids.extend(list(b["image_ids"])[:n])
        out.gt_objects.extend([set(g) for g in b["gt_objects"]][:n])
    return out


def mention_labels(gen: Generations, chair_vocab) -> tuple[list[float], list[bool]]:
    """(scores, is_hallucinated) over mentions whose word CHAIR knows (others are skipped).

    A mention is hallucinated when CHAIR maps its word to an object not in the image's
    ground truth."""
    node_of: dict[str, Optional[str]] = {}
    scores, labels = [], []
    for forms, ss, gt in zip(gen.mention_forms, gen.mention_scores, gen.gt_objects):
        for form, s in zip(forms, ss):
            if form not in node_of:
                found = chair_lib.caption_objects(form, chair_vocab)
                node_of[form] = found[0][1] if found else None
            node = node_of[form]
            if node is not None:
                scores.append(s)
                labels.append(node not in gt)
    return scores, labels


def chair_metrics(gen: Generations, chair_vocab) -> dict:
    """CHAIRs, CHAIRi, Recall, Len (percent / tokens) of the generated texts."""
    caps = [{"image_id": i, "caption": t} for i, t in zip(gen.image_ids, gen.texts)]
    gt = {i: g for i, g in zip(gen.image_ids, gen.gt_objects)}
    res = chair_lib.chair_scores(caps, gt, chair_vocab)
    return {k: float(res[k]) for k in ("CHAIRs", "CHAIRi", "Recall", "Len")}


def mention_rewards(gen: Generations, rp: RewardParams) -> np.ndarray:
    """FiSAO reward of every mention under the reward params (for the before/after figure)."""
    flat = np.asarray([s for ss in gen.mention_scores for s in ss], np.float32)
    if flat.size == 0:
        return flat
    return np.asarray(score_reward(flat, rp))
