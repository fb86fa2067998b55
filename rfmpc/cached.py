"""``CachedGenerator``: text-to-image that serves prompts from a trajectory cache.

For each prompt of a call, in this order:

1. **Exact repeat** (same prompt, settings and seed as an image served before): the stored final
   latent is returned, 0 model calls.
2. **Hit**: the most similar cached prompt (pooled text embedding, cosine, same model and
   settings only) is at least ``policy.min_similarity`` away and caches a step the
   :class:`~rfmpc.cache.ResumePolicy` picks for that similarity: prompt B resumes from prompt
   A's state at that step, steered by the switch controller (default ``MPC()``), for
   ``N - k`` model calls. The image then comes from the *cached entry's* noise, not from the
   requested seed; the record says so (``seed_used``).
3. **Miss**: generated from scratch (``N`` calls, exactly what ``pipe(prompt, seed=seed)``
   returns), and stored: A's states at the steps the policy can resume from, its velocity at
   those steps (recovered from consecutive states, ``v_k = (x_{k+1} - x_k) / (sigma_{k+1} -
   sigma_k)``, no extra call), its final latent, its seed.

A call runs all its misses as one batch and its hits grouped by resume step, each group one
``switch_batch`` (``vmap``), so an accelerator batch stays full. Hits and repeats do not become
resumable entries (a switched trajectory is not B's own); a served hit is recorded under a
separate config hash so that its exact repeat is free and identical.

Every image gets a :class:`GenerationRecord`: kind, entry id, cached prompt, similarity, resume
step, model calls (forwards, JVPs, VJPs), controller, fallback, wall time. A damaged cache entry
is reported (``store.problems``, a ``CacheWarning``) and skipped; the prompt is served by the
next match or generated from scratch.

The cache key (``config_hash``) holds everything that changes a trajectory: the model (id and
architecture), the number of steps, the scheduler shift, the guidance scale, the latent shape
(resolution) and the compute dtype. Several processes may share one
:class:`~rfmpc.cache.DiskCacheStore`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rfmpc.cache import AbstractCacheStore, CacheEntry, ResumePolicy, config_hash
from rfmpc.control import (
    MPC,
    AbstractController,
    SwitchCache,
    stack_states,
    switch_batch,
)
from rfmpc.flow import TrajectoryState
from rfmpc.pipeline import Pipeline, UnknownWordsWarning, check_vocabulary, to_pil

__all__ = ["CachedGenerator", "CachedOutput", "GenerationRecord"]

_SERVED = "/served"  # config-hash suffix of served (switched) outputs: repeats only


@dataclasses.dataclass(frozen=True)
class GenerationRecord:
    """Provenance of one image (see the module docstring).

    ``kind`` is ``"miss"`` (generated from scratch, and stored), ``"hit"`` (resumed from
    ``cached_prompt``'s state at ``resume_step``) or ``"repeat"`` (the stored final latent).
    ``seed`` is the requested seed; ``seed_used`` the seed of the noise the image actually
    came from (the cached entry's on a hit). ``nfe`` counts forward model calls; ``jvps`` /
    ``vjps`` the JVPs and VJPs. ``wall_s`` is the wall time of the batch that produced the image
    divided by its size (``batch``).
    """

    prompt: str
    seed: int
    seed_used: int | None
    steps: int
    kind: str
    entry_id: str | None
    cached_prompt: str | None
    similarity: float | None
    resume_step: int | None
    nfe: int
    jvps: int
    vjps: int
    controller: str | None
    fallback: bool
    fallback_reason: str | None
    wall_s: float
    batch: int
    stored: str | None = None
    note: str | None = None

    @property
    def from_cache(self) -> bool:
        return self.kind != "miss"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["from_cache"] = self.from_cache
        return d


@dataclasses.dataclass(frozen=True)
class CachedOutput:
    """``images`` (NHWC in [0, 1], or PIL / latents by ``output_type``), ``latents`` and one
    :class:`GenerationRecord` per prompt, in the order given."""

    images: Any
    latents: jax.Array
    records: list[GenerationRecord]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
    return int(seed)


def _meta(entry: CacheEntry) -> dict:
    return next(iter(entry.states.values())).metadata


class CachedGenerator:
    """Serve prompts from a trajectory cache (see the module docstring).

    Args:
        pipe: the :class:`~rfmpc.pipeline.Pipeline`.
        store: a cache store (``DiskCacheStore(dir)`` or ``MemoryCacheStore()``).
        controller: the switch controller on hits (default ``MPC()``).
        policy: similarity -> resume step (default ``ResumePolicy()``).
        num_inference_steps, guidance_scale, height, width: the generation settings (default:
            the pipeline's); all enter the cache key.
        store_steps: the steps a miss stores (default: every step the policy can pick at this
            ``N``).
        batch_buckets: batches (misses, and each group of hits) are padded up to the next of
            these sizes by repeating their last prompt (the padding is computed and discarded),
            so a stream of calls compiles one program per bucket instead of one per batch size.
            ``()`` disables padding.
    """

    def __init__(
        self,
        pipe: Pipeline,
        store: AbstractCacheStore,
        controller: AbstractController | None = None,
        policy: ResumePolicy | None = None,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        store_steps: Sequence[int] | None = None,
        batch_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    ):
        if not isinstance(pipe, Pipeline):
            raise TypeError(f"pipe must be a rfmpc Pipeline (load_pipeline), got {type(pipe)}")
        if not isinstance(store, AbstractCacheStore):
            raise TypeError(
                f"store must be a cache store (DiskCacheStore or MemoryCacheStore), got "
                f"{type(store).__name__}"
            )
        controller = MPC() if controller is None else controller
        if not isinstance(controller, AbstractController):
            raise TypeError(
                f"controller must be a controller object such as MPC() or Direct(), got "
                f"{controller!r}"
            )
        policy = ResumePolicy() if policy is None else policy
        if not isinstance(policy, ResumePolicy):
            raise TypeError(f"policy must be a ResumePolicy, got {type(policy).__name__}")
        steps = pipe.default_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"num_inference_steps must be an int >= 2, got {steps!r}")
        g = pipe.default_guidance if guidance_scale is None else guidance_scale
        if not (isinstance(g, (int, float)) and math.isfinite(g) and g >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {g!r}")
        self.pipe, self.store, self.controller, self.policy = pipe, store, controller, policy
        self.steps, self.guidance = steps, float(g)
        self.shape = pipe.latent_shape(1, height, width)
        self.height, self.width = height, width
        if store_steps is None:
            store_steps = sorted(
                {math.floor(f * steps) for f in policy.fractions} - set(range(policy.min_step))
            )
        steps_ok = all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 1 <= s < steps
            for s in store_steps
        )
        if not store_steps or not steps_ok:
            raise ValueError(
                f"store_steps must be a non-empty list of steps in [1, {steps - 1}], got "
                f"{list(store_steps)!r}"
            )
        self.store_steps = tuple(sorted(int(s) for s in store_steps))
        buckets = tuple(sorted(int(b) for b in batch_buckets))
        if any(b < 1 for b in buckets):
            raise ValueError(f"batch_buckets must be sizes >= 1, got {batch_buckets!r}")
        self.batch_buckets = buckets
        dtype = str(jax.tree.leaves(pipe.transformer.params)[0].dtype)
        self.config_hash = config_hash(
            pipeline=pipe.config_hash(self.shape, steps), guidance=self.guidance, dtype=dtype
        )
        self._served_hash = self.config_hash + _SERVED
        self.field = pipe.guided_field(self.guidance)

    # ------------------------------------------------------------------ lookups
    def _repeat(self, prompt: str, seed: int) -> tuple[CacheEntry, jax.Array] | None:
        for chash in (self.config_hash, self._served_hash):
            for entry in self.store.find_prompt(
                prompt, model_id=self.pipe.model_id, config_hash=chash
            ):
                if _meta(entry).get("seed") != seed:
                    continue
                if "final" in entry.extras:
                    final = jnp.asarray(entry.extras["final"])
                elif self.steps in entry.states:
                    final = entry.states[self.steps].x
                else:
                    continue
                self.store.touch(entry.entry_id)
                return entry, final
        return None

    def _pipe_call(self, prompts, noise, capture):
        return self.pipe(
            prompts,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            height=self.height,
            width=self.width,
            latents=noise,
            return_states=capture,
            output_type="latent",
        )

    # ------------------------------------------------------------------ the call
    def __call__(
        self,
        prompts: str | Sequence[str],
        seed: int | Sequence[int] = 0,
        *,
        output_type: str = "np",
        strict: bool = False,
    ) -> CachedOutput:
        """Generate ``prompts`` (one seed for all, or one per prompt). ``strict``: see
        :meth:`rfmpc.pipeline.Pipeline.__call__` (words outside the embedded vocabulary)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"every prompt must be a str, got {type(p).__name__}")
        seeds = [seed] * len(prompts) if not isinstance(seed, (list, tuple)) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(
                f"seed has {len(seeds)} entries for {len(prompts)} prompts: give one int or one "
                "seed per prompt"
            )
        seeds = [_check_seed(s) for s in seeds]
        if output_type not in ("np", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'latent', got {output_type!r}")
        check_vocabulary(self.pipe.text_encoder, prompts, strict)
        n = len(prompts)
        latents: list[Any] = [None] * n
        records: list[GenerationRecord | None] = [None] * n
        pooled = np.asarray(self.pipe.text_encoder.pooled(prompts), np.float32)
        first: dict[tuple[str, int], int] = {}
        dupes: dict[int, int] = {}
        hits: dict[tuple[int, bool, bool], list] = {}
        misses: list[int] = []
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            if (p, s) in first:  # the same request twice in one call: served once
                dupes[i] = first[p, s]
                continue
            first[p, s] = i
            t0 = time.perf_counter()
            n_problems = len(self.store.problems)
            rep = self._repeat(p, s)
            if rep is not None:
                entry, final = rep
                latents[i] = final
                records[i] = self._record(
                    p,
                    s,
                    "repeat",
                    entry,
                    None,
                    None,
                    wall=time.perf_counter() - t0,
                    seed_used=_meta(entry).get("seed_used", s),
                    batch=1,
                )
                continue
            hit = self.store.lookup(
                pooled[i],
                self.steps,
                self.policy,
                model_id=self.pipe.model_id,
                config_hash=self.config_hash,
            )
            skipped = self.store.problems[n_problems:]
            if hit is None:
                misses.append(i)
                if skipped:
                    records[i] = dataclasses.replace(
                        self._record(p, s, "miss", None, None, None, 0.0, s, 1),
                        note=f"skipped damaged cache entries {[q.entry_id for q in skipped]}",
                    )
                continue
            ex = hit.entry.extras
            key = (hit.step, f"velocity/{hit.step}" in ex, "final" in ex)
            hits.setdefault(key, []).append((i, hit))
        if misses:
            self._generate(misses, prompts, seeds, pooled, latents, records)
        for key, group in hits.items():
            self._switch(key, group, prompts, seeds, pooled, latents, records)
        for i, j in dupes.items():
            latents[i] = latents[j]
            records[i] = dataclasses.replace(
                records[j],
                kind="repeat",
                nfe=0,
                jvps=0,
                vjps=0,
                wall_s=0.0,
                stored=None,
                note=f"the same prompt and seed as image {j} of this call",
            )
        x = jnp.concatenate([jnp.asarray(a) for a in latents])
        if output_type == "latent":
            images = x
        else:
            images = np.asarray(self.pipe.decode(x), np.float32)
            if output_type == "pil":
                images = to_pil(images)
        return CachedOutput(images=images, latents=x, records=list(records))

    def _record(self, p, s, kind, entry, hit, res, wall, seed_used, batch, **kw):
        return GenerationRecord(
            prompt=p,
            seed=s,
            seed_used=seed_used,
            steps=self.steps,
            kind=kind,
            entry_id=None if entry is None else entry.entry_id,
            cached_prompt=None if entry is None else entry.prompt,
            similarity=None if hit is None else float(hit.similarity),
            resume_step=None if hit is None else int(hit.step),
            nfe=kw.pop("nfe", 0),
            jvps=kw.pop("jvps", 0),
            vjps=kw.pop("vjps", 0),
            controller=kw.pop("controller", None),
            fallback=kw.pop("fallback", False),
            fallback_reason=kw.pop("fallback_reason", None),
            wall_s=wall,
            batch=batch,
            **kw,
        )

    def _padded(self, n: int) -> int:
        """The batch size ``n`` requests are computed at (the next bucket, or ``n``)."""
        return next((b for b in self.batch_buckets if b >= n), n)

    def _generate(self, idx, prompts, seeds, pooled, latents, records) -> None:
        """Misses: one batch from scratch, then one resumable entry per prompt."""
        t0 = time.perf_counter()
        run = idx + [idx[-1]] * (self._padded(len(idx)) - len(idx))
        ps = [prompts[i] for i in run]
        noise = jnp.concatenate(
            [jax.random.normal(jax.random.key(seeds[i]), self.shape, jnp.float32) for i in run]
        )
        capture = sorted(set(self.store_steps) | {s + 1 for s in self.store_steps})
        with warnings.catch_warnings():  # __call__ already warned about unknown words
            warnings.simplefilter("ignore", UnknownWordsWarning)
            out = self._pipe_call(ps, noise, capture)
        wall = (time.perf_counter() - t0) / len(idx)
        sig = out.sigmas
        for j, i in enumerate(idx):
            take = lambda a, j=j: a[j : j + 1]
            meta = {
                "prompt": prompts[i],
                "model_id": self.pipe.model_id,
                "seed": seeds[i],
                "seed_used": seeds[i],
                "guidance_scale": self.guidance,
            }
            key = jax.random.key(seeds[i])
            states, extras = {}, {"final": np.asarray(take(out.latents))}
            for k in self.store_steps:
                st = out.states[k]
                states[k] = TrajectoryState(
                    take(st.x), k, sig, key=key, cond=jax.tree.map(take, st.cond), meta=meta
                )
                v = (take(out.states[k + 1].x) - take(st.x)) / (sig[k + 1] - sig[k])
                extras[f"velocity/{k}"] = np.asarray(v)
            eid = self.store.put(
                prompts[i],
                pooled[i],
                states,
                model_id=self.pipe.model_id,
                config_hash=self.config_hash,
                extras=extras,
            )
            latents[i] = take(out.latents)
            note = None if records[i] is None else records[i].note
            records[i] = self._record(
                prompts[i],
                seeds[i],
                "miss",
                None,
                None,
                None,
                wall,
                seeds[i],
                len(idx),
                nfe=self.steps,
                stored=eid,
                note=note,
            )

    def _switch(self, key, group, prompts, seeds, pooled, latents, records) -> None:
        """Hits at one resume step: one ``switch_batch``; the outputs recorded for repeats."""
        k, has_v, has_final = key
        t0 = time.perf_counter()
        real = len(group)
        group = group + [group[-1]] * (self._padded(real) - real)
        idx = [i for i, _ in group]
        states = stack_states([h.state for _, h in group])
        conds_b = jax.tree.map(
            lambda a: a[:, None], self.pipe.encode_prompt([prompts[i] for i in idx])
        )
        ex = [h.entry.extras for _, h in group]
        cached = SwitchCache(
            velocity=jnp.stack([jnp.asarray(e[f"velocity/{k}"]) for e in ex]) if has_v else None,
            final=jnp.stack([jnp.asarray(e["final"]) for e in ex]) if has_final else None,
        )
        sims = jnp.asarray([h.similarity for _, h in group], jnp.float32)
        res = switch_batch(
            self.field, states, conds_b, self.controller, similarity=sims, cached=cached
        )
        wall = (time.perf_counter() - t0) / real
        name = type(self.controller).__name__
        for j, (i, hit) in enumerate(group[:real]):
            x = res.x[j]
            seed_used = _meta(hit.entry).get("seed_used")
            st = hit.state
            meta = {
                "prompt": prompts[i],
                "model_id": self.pipe.model_id,
                "seed": seeds[i],
                "seed_used": seed_used,
                "served_from": hit.entry.entry_id,
            }
            served = TrajectoryState(
                x,
                self.steps,
                st.sigmas,
                key=st.key,
                cond=jax.tree.map(lambda a, j=j: a[j], conds_b),
                meta=meta,
            )
            self.store.put(
                prompts[i],
                pooled[i],
                {self.steps: served},
                model_id=self.pipe.model_id,
                config_hash=self._served_hash,
            )
            latents[i] = x
            note = None
            if seed_used != seeds[i]:
                note = (
                    f"resumed from the cached entry's noise (seed {seed_used}), not from seed "
                    f"{seeds[i]}"
                )
            records[i] = self._record(
                prompts[i],
                seeds[i],
                "hit",
                hit.entry,
                hit,
                res,
                wall,
                seed_used,
                len(idx),
                nfe=int(res.cost.forwards[j]),
                jvps=int(res.cost.jvps[j]),
                vjps=int(res.cost.vjps[j]),
                controller=name,
                fallback=bool(res.fallback[j]),
                fallback_reason=res.fallback_reasons[j],
                note=note,
            )
