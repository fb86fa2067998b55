"""Which cached step to resume from, given how similar the cached prompt is.

The more similar the cached prompt A is to the new prompt B, the more of A's trajectory B can
reuse: the coarse layout is fixed in the first, high-noise steps, and prompts that agree on it
can share them. NIRVANA (Agarwal et al., "Approximate Caching for Efficiently Serving
Text-to-Image Diffusion Models", NSDI 2024) retrieves a cached intermediate noise state and
chooses the number of skipped steps K from the query-to-cache similarity (higher similarity,
larger K). The reference write-up (Patel, "Shooting Method and MPC for
Cross-Prompt Caching in Rectified Flow Models", 2025) uses similarity bands 0.95 / 0.90 / 0.85 and
generates from scratch below 0.85.

Two mappings ship (fraction of the N steps skipped, i.e. the target resume step
``floor(f * N)``):

``ResumePolicy()``, the serving default, fitted on the dev prompt streams of
``benchmarks/cache_stream.py --fit`` (``docs/cache.md``):

=====================  ==========  =====================
cosine similarity      fraction    N = 28 -> target step
=====================  ==========  =====================
>= 0.97                0.80        22
< 0.97                 --          generate from scratch
=====================  ==========  =====================

Above 0.97 the cached prompt is the same prompt (another seed) or a paraphrase: it shares the
layout *and* the details, so B resumes late. One-attribute edits lie mostly in 0.85-0.97; resuming
them at the write-up's steps saved fewer calls over a stream than generating them and caching
their states (a miss becomes an entry that later paraphrases resume from late; a hit does not).

``ResumePolicy.edit_bands()``, the write-up's bands for a cross-prompt edit (``rfmpc switch
--auto``, and the extension below the serving threshold that ``rfmpc generate --min-similarity``
uses):

=====================  ==========  =====================
cosine similarity      fraction    N = 28 -> target step
=====================  ==========  =====================
>= 0.95                0.45        12
[0.90, 0.95)           0.30        8
[0.85, 0.90)           0.20        5
< 0.85                 --          generate from scratch
=====================  ==========  =====================

These are more conservative than the speedups the write-up reports (2.25x / 1.75x / 1.45x,
i.e. ~56% / 43% / 31% of steps skipped). The chosen step is the largest *cached* step not
exceeding the target.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from itertools import pairwise

__all__ = ["ResumePolicy"]


@dataclasses.dataclass(frozen=True)
class ResumePolicy:
    """Similarity bands -> resume step.

    Attributes:
        thresholds: strictly decreasing similarity thresholds in (-1, 1]; a similarity at or
            above ``thresholds[i]`` (and below ``thresholds[i - 1]``) maps to ``fractions[i]``.
            Below the last threshold: generate from scratch.
        fractions: fraction of ``num_steps`` to skip per band, in [0, 1), non-increasing (so a
            higher similarity never resumes earlier).
        min_step: smallest resume step worth taking (resuming at step 0 saves nothing).
    """

    thresholds: tuple[float, ...] = (0.97,)
    fractions: tuple[float, ...] = (0.80,)
    min_step: int = 1

    def __post_init__(self):
        th = tuple(float(t) for t in self.thresholds)
        fr = tuple(float(f) for f in self.fractions)
        if not th or len(th) != len(fr):
            raise ValueError(
                f"thresholds and fractions must be non-empty and of equal length, got {len(th)} "
                f"and {len(fr)}"
            )
        if any(not math.isfinite(t) or not -1.0 < t <= 1.0 for t in th):
            raise ValueError(f"thresholds must lie in (-1, 1], got {th}")
        if any(a <= b for a, b in pairwise(th)):
            raise ValueError(f"thresholds must be strictly decreasing, got {th}")
        if any(not math.isfinite(f) or not 0.0 <= f < 1.0 for f in fr):
            raise ValueError(f"fractions must lie in [0, 1), got {fr}")
        if any(a < b for a, b in pairwise(fr)):
            raise ValueError(
                f"fractions must be non-increasing (higher similarity never resumes earlier), got "
                f"{fr}"
            )
        if isinstance(self.min_step, bool) or not isinstance(self.min_step, int):
            raise TypeError(f"min_step must be an int, got {self.min_step!r}")
        if self.min_step < 1:
            raise ValueError(f"min_step must be >= 1, got {self.min_step}")
        object.__setattr__(self, "thresholds", th)
        object.__setattr__(self, "fractions", fr)

    @classmethod
    def edit_bands(cls, min_step: int = 1) -> ResumePolicy:
        """The write-up's bands for a cross-prompt edit: 0.95 / 0.90 / 0.85 -> 0.45 / 0.30 /
        0.20 of the steps (module docstring)."""
        return cls(thresholds=(0.95, 0.90, 0.85), fractions=(0.45, 0.30, 0.20), min_step=min_step)

    def with_lower_bands(self, other: ResumePolicy) -> ResumePolicy:
        """This policy's bands, then ``other``'s bands below this policy's lowest threshold (each
        fraction capped by the one above it, so a higher similarity never resumes earlier)."""
        if not isinstance(other, ResumePolicy):
            raise TypeError(f"other must be a ResumePolicy, got {type(other).__name__}")
        th, fr = list(self.thresholds), list(self.fractions)
        for t, f in zip(other.thresholds, other.fractions):
            if t < th[-1]:
                th.append(t)
                fr.append(min(f, fr[-1]))
        return dataclasses.replace(self, thresholds=tuple(th), fractions=tuple(fr))

    def with_min_similarity(self, min_similarity: float) -> ResumePolicy:
        """This policy with no band below ``min_similarity`` (the bands above it unchanged; a
        floor above every threshold keeps the top band's fraction above the floor)."""
        x = float(min_similarity)
        if not (math.isfinite(x) and -1.0 < x <= 1.0):
            raise ValueError(f"min_similarity must lie in (-1, 1], got {min_similarity!r}")
        keep = [(t, f) for t, f in zip(self.thresholds, self.fractions) if t > x]
        lower = [f for t, f in zip(self.thresholds, self.fractions) if t <= x]
        frac = lower[0] if lower else self.fractions[-1]
        keep.append((x, frac if not keep else min(frac, keep[-1][1])))
        th, fr = zip(*keep)
        return dataclasses.replace(self, thresholds=tuple(th), fractions=tuple(fr))

    @property
    def min_similarity(self) -> float:
        """Below this similarity the policy always generates from scratch."""
        return self.thresholds[-1]

    def target_step(self, similarity: float, num_steps: int) -> int | None:
        """The step the policy would like to resume at (None: generate from scratch)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        sim = float(similarity)
        if math.isnan(sim):
            raise ValueError("similarity is NaN")
        for t, f in zip(self.thresholds, self.fractions):
            if sim >= t:
                step = math.floor(f * num_steps)
                return step if step >= self.min_step else None
        return None

    def choose_step(
        self, similarity: float, num_steps: int, available_steps: Iterable[int]
    ) -> int | None:
        """The largest available cached step in ``[min_step, target]``, or None (from scratch).

        Monotone: for fixed ``num_steps`` and ``available_steps``, a higher similarity never
        gives an earlier step, and a similarity below ``min_similarity`` always gives None.
        """
        target = self.target_step(similarity, num_steps)
        if target is None:
            return None
        ok = [int(s) for s in available_steps if self.min_step <= int(s) <= target]
        return max(ok) if ok else None
