"""Baseline scores s_c, s_h, s_min, s_max (SPEC step 5) and the score/reward histograms.

From the verifier scores of every entity mention in calibration responses, labelled
correct (the object is in the image) or hallucinated: s_c = mean score of correct
mentions, s_h = mean of hallucinated ones, s_min / s_max = low / high percentiles of all
scores (numpy's linear interpolation). Saved as JSON with the run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from fisao_jax import atomic
from fisao_jax.rewards.reward import RewardParams

_FLOAT_KEYS = ("s_c", "s_h", "s_min", "s_max", "low_pct", "high_pct")
_INT_KEYS = ("num_correct", "num_hallucinated")


@dataclasses.dataclass(frozen=True)
class BaselineScores:
    """Reward boundaries from calibration mentions; scores are `100 * cos`."""

    s_c: float  # mean score of correct mentions
    s_h: float  # mean score of hallucinated mentions
    s_min: float  # low_pct percentile of all mention scores
    s_max: float  # high_pct percentile of all mention scores
    low_pct: float = 1.0
    high_pct: float = 99.0
    num_correct: int = 0
    num_hallucinated: int = 0

    @classmethod
    def from_mentions(cls, scores: Sequence[float], is_hallucinated: Sequence[bool],
                      low_pct: float = 1.0, high_pct: float = 99.0) -> "BaselineScores":
        """Compute the baseline from per-mention scores [N] and labels [N].

        Raises ValueError when the lengths differ, a score is not finite, the percentiles
        are not 0 <= low < high <= 100, either label has no mentions, or s_max == s_min.
        """
        scores = np.asarray(scores, np.float64).reshape(-1)
        labels = np.asarray(is_hallucinated).reshape(-1)
        if labels.dtype != bool:
            if not np.isin(labels, (0, 1)).all():
                raise ValueError("is_hallucinated must be booleans (or 0/1)")
            labels = labels.astype(bool)
        if scores.shape != labels.shape:
            raise ValueError(f"scores ({scores.size}) and is_hallucinated ({labels.size}) "
                             f"differ in length")
        if not np.isfinite(scores).all():
            bad = int(np.flatnonzero(~np.isfinite(scores))[0])
            raise ValueError(f"score {bad} is not finite: {scores[bad]}")
        if not 0.0 <= low_pct < high_pct <= 100.0:
            raise ValueError(f"need 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}")
        n_h = int(labels.sum())
        n_c = int(labels.size - n_h)
        if n_c == 0:
            raise ValueError(f"no correct mentions among {labels.size}: cannot compute s_c")
        if n_h == 0:
            raise ValueError(f"no hallucinated mentions among {labels.size}: cannot compute s_h")
        s_min, s_max = np.percentile(scores, [low_pct, high_pct])
        if not s_max > s_min:
            raise ValueError(f"the {low_pct} and {high_pct} percentiles of the scores are equal "
                             f"({s_min}); the reward would divide by zero")
        return cls(s_c=float(scores[~labels].mean()), s_h=float(scores[labels].mean()),
                   s_min=float(s_min), s_max=float(s_max), low_pct=float(low_pct),
                   high_pct=float(high_pct), num_correct=n_c, num_hallucinated=n_h)

    def reward_params(self, margin: float):
        """The `RewardParams` pytree of these scores and the margin lambda."""
        return RewardParams.create(margin, self.s_c, self.s_h, self.s_min, self.s_max)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (temp file in the same folder, then rename)."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic.write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BaselineScores":
        """Read JSON written by `save`; ValueError naming the file and key on bad content."""
        try:
            doc = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"baseline scores not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a JSON object")
        values: dict[str, Any] = {}
        for key in ("s_c", "s_h", "s_min", "s_max"):
            if key not in doc:
                raise ValueError(f"{path}: missing key {key!r}")
        for key in _FLOAT_KEYS:
            if key in doc:
                v = doc[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"{path}: key {key!r} must be a finite number, got {v!r}")
                values[key] = float(v)
        for key in _INT_KEYS:
            if key in doc:
                if isinstance(doc[key], bool) or not isinstance(doc[key], int):
                    raise ValueError(f"{path}: key {key!r} must be an integer, got {doc[key]!r}")
                values[key] = doc[key]
        unknown = sorted(set(doc) - set(_FLOAT_KEYS) - set(_INT_KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        if not values["s_max"] > values["s_min"]:
            raise ValueError(f"{path}: s_max ({values['s_max']}) must exceed s_min ({values['s_min']})")
        return cls(**values)


def plot_score_histograms(scores: Sequence[float], is_hallucinated: Sequence[bool],
                          path: str | os.PathLike, baseline: BaselineScores | None = None,
                          bins: int = 40, title: str = "Verifier scores of object mentions") -> None:
    """PNG of score histograms, correct vs hallucinated mentions (the paper's Figure 1).

    Densities share bins; vertical lines mark s_c, s_h (dashed) and s_min, s_max (dotted)
    when `baseline` is given.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(is_hallucinated, bool).reshape(-1)
    if scores.shape != labels.shape or scores.size == 0:
        raise ValueError(f"need equally many scores and labels (got {scores.size}, {labels.size})")
    fig, ax = _figure()
    edges = np.histogram_bin_edges(scores, bins=bins)
    for mask, name, color in ((~labels, "correct", "tab:blue"), (labels, "hallucinated", "tab:red")):
        if mask.any():
            ax.hist(scores[mask], bins=edges, density=True, alpha=0.5, color=color,
                    label=f"{name} (n={int(mask.sum())})")
    if baseline is not None:
        for value, name, color, style in (
                (baseline.s_c, "$s_c$", "tab:blue", "--"), (baseline.s_h, "$s_h$", "tab:red", "--"),
                (baseline.s_min, "$s_{min}$", "gray", ":"), (baseline.s_max, "$s_{max}$", "gray", ":")):
            ax.axvline(value, color=color, linestyle=style, linewidth=1.5,
                       label=f"{name} = {value:.2f}")
    ax.set_xlabel("score (100 × cosine similarity)")
    ax.set_ylabel("density")
    ax.set_title(title)
    fig.legend(frameon=False, loc="outside lower center", ncols=3)
    _save_png(fig, pathlib.Path(path))


def plot_reward_shift(before: Sequence[float], after: Sequence[float], path: str | os.PathLike,
                      labels: tuple[str, str] = ("before training", "after training"),
                      bins: int = 40, xlabel: str = "reward of generated objects",
                      title: str = "Reward distribution of generated objects") -> None:
    """PNG of two overlaid histograms with their means (the paper's Figure 4)."""
    before = np.asarray(before, np.float64).reshape(-1)
    after = np.asarray(after, np.float64).reshape(-1)
    if before.size == 0 or after.size == 0:
        raise ValueError(f"need values before and after (got {before.size}, {after.size})")
    fig, ax = _figure()
    edges = np.histogram_bin_edges(np.concatenate([before, after]), bins=bins)
    for values, name, color in ((before, labels[0], "tab:gray"), (after, labels[1], "tab:green")):
        ax.hist(values, bins=edges, density=True, alpha=0.5, color=color,
                label=f"{name} (n={values.size}, mean {values.mean():.2f})")
        ax.axvline(values.mean(), color=color, linestyle="--", linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    fig.legend(frameon=False, loc="outside lower center", ncols=2)
    _save_png(fig, pathlib.Path(path))


def _figure():
    # An explicit Agg figure: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _save_png(fig, path: pathlib.Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic.write_bytes(path, buffer.getvalue())
