"""Progress meters: diffrax's meter objects passed into the solve, no process-global bar.

Every solve opens its own meter (diffrax keeps host-side bars keyed by a per-solve index), so
two solves or pipelines running at once each drive their own bar, and a meter never changes the
latents. The bars here are diffrax's real ``TqdmProgressMeter`` with ``tqdm.tqdm`` replaced by a
recording subclass that writes to a buffer.
"""

from __future__ import annotations

import io
import threading

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tqdm
from _models import tiny_mmdit_pipeline

from rfmpc.flow import flowmatch_sigmas, integrate, integrate_path


def _field(x, sigma, cond):
    return jnp.tanh(x * cond) + sigma - x


@pytest.fixture
def bars(monkeypatch):
    """Every ``tqdm.tqdm`` a meter opens, each recording the ``n`` it showed and its close."""
    made = []
    lock = threading.Lock()

    class RecordingBar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            self.shown: list[float] = []  # tqdm's __init__ refreshes once (showing 0)
            self.closed = 0
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)
            with lock:
                made.append(self)

        def refresh(self, *args, **kwargs):
            self.shown.append(float(self.n))
            return super().refresh(*args, **kwargs)

        def close(self):
            if not self.disable:
                self.closed += 1
            return super().close()

    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)
    return made


def _shown(sigmas) -> list[float]:
    """What a per-step tqdm meter shows on this grid: 0, then the percentage of the sigma
    interval done after each step."""
    s = np.asarray(sigmas, np.float64)
    return [0.0] + [round(100 * float((s[0] - t) / (s[0] - s[-1])), 2) for t in s[1:]]


def test_meter_does_not_change_the_path(getkey):
    x = jax.random.normal(getkey(), (2, 4, 4, 3))
    sig = flowmatch_sigmas(6, shift=3.0)
    plain = integrate(_field, x, sig, 0.7).x
    for meter in (
        diffrax.NoProgressMeter(),
        diffrax.TextProgressMeter(minimum_increase=2.0),  # only its first and last lines
        diffrax.TqdmProgressMeter(refresh_steps=1),
    ):
        got = integrate(_field, x, sig, 0.7, progress_meter=meter).x
        np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))
        _, xs = integrate_path(_field, x, sig, 0.7, progress_meter=meter)
        np.testing.assert_array_equal(np.asarray(xs[-1]), np.asarray(plain))
    # resume bit-exact with a meter on each segment
    meter = diffrax.TqdmProgressMeter(refresh_steps=1)
    mid = integrate(_field, x, sig, 0.7, stop=2, progress_meter=meter)
    rest = integrate(_field, mid, progress_meter=meter).x
    np.testing.assert_array_equal(np.asarray(rest), np.asarray(plain))
    # inside an outer jit, and through a gradient (diffrax drives the meter by callbacks)
    jitted = jax.jit(lambda x_: integrate(_field, x_, sig, 0.7, progress_meter=meter).x)(x)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(plain))

    def loss(c, m):
        return jnp.sum(integrate(_field, x, sig, c, progress_meter=m).x ** 2)

    g0 = jax.grad(loss)(0.7, diffrax.NoProgressMeter())
    g1 = jax.grad(loss)(0.7, meter)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g0))


def test_each_solve_drives_its_own_meter(bars, getkey):
    """Two solves with their own meters, interleaved and then in two threads at once."""
    x = jax.random.normal(getkey(), (1, 4, 4, 3))
    grids = {"a": flowmatch_sigmas(4), "b": flowmatch_sigmas(7, shift=3.0)}
    meters = {"a": diffrax.TqdmProgressMeter(refresh_steps=1), "b": diffrax.TqdmProgressMeter()}
    ref = {k: integrate(_field, x, g, 0.5).x for k, g in grids.items()}

    def check(made, which):
        assert len(made) == len(which)
        for bar, k in zip(made, which):
            assert bar.closed == 1 and bar.n == 100
            if meters[k].refresh_steps == 1:  # every step shown, in order, nothing foreign
                assert bar.shown == pytest.approx(_shown(grids[k]), abs=0.02)
            else:  # refreshed on step 0 only (of 7 < 20)
                assert bar.shown == pytest.approx(_shown(grids[k])[:2], abs=0.02)

    # interleaved: a, b, a (each solve opens and closes a bar of its own)
    for k in ("a", "b", "a"):
        out = integrate(_field, x, grids[k], 0.5, progress_meter=meters[k]).x
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref[k]))
    jax.effects_barrier()
    check(bars, ["a", "b", "a"])

    # concurrently: both solves in flight at once, each with its own meter
    bars.clear()
    start = threading.Barrier(2)
    outs, errors = {}, []

    def run(k):
        try:
            start.wait()
            outs[k] = integrate(_field, x, grids[k], 0.5, progress_meter=meters[k]).x
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jax.effects_barrier()
    assert not errors, errors
    for k in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(outs[k]), np.asarray(ref[k]))
    assert len(bars) == 2 and all(b.closed == 1 and b.n == 100 for b in bars)
    # which bar is whose is up to the scheduler: a's shows each of its 4 steps, b's its first
    got = sorted((b.shown for b in bars), key=len)
    assert got[0] == pytest.approx(_shown(grids["b"])[:2], abs=0.02)
    assert got[1] == pytest.approx(_shown(grids["a"]), abs=0.02)


def test_solve_rejects_a_non_meter(getkey):
    x = jax.random.normal(getkey(), (1, 2, 2, 3))
    with pytest.raises(TypeError, match=r"progress_meter must be a diffrax\.AbstractProgressMeter"):
        integrate(_field, x, flowmatch_sigmas(2), 0.5, progress_meter=True)


@pytest.fixture(scope="module")
def pipes():
    return tiny_mmdit_pipeline(16, seed=0), tiny_mmdit_pipeline(16, seed=1)


def test_pipelines_with_their_own_meters(pipes, bars):
    p1, p2 = pipes
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="latent")
    ref1 = p1(["a"], seed=1, **kw).latents
    ref2 = p2(["b"], seed=2, return_states=[1], **kw).latents
    assert not bars

    # interleaved and concurrent pipelines: each call its own bar(s), same latents
    m1, m2 = diffrax.TqdmProgressMeter(refresh_steps=1), diffrax.TqdmProgressMeter(refresh_steps=1)
    out = {}
    start = threading.Barrier(2)

    def run(name, fn):
        start.wait()
        out[name] = fn()

    threads = [
        threading.Thread(
            target=run, args=("1", lambda: p1(["a"], seed=1, progress_meter=m1, **kw))
        ),
        threading.Thread(
            target=run,
            args=("2", lambda: p2(["b"], seed=2, return_states=[1], progress_meter=m2, **kw)),
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(np.asarray(out["1"].latents), np.asarray(ref1))
    np.testing.assert_array_equal(np.asarray(out["2"].latents), np.asarray(ref2))
    # p1: one solve (3 steps); p2: two segments (steps 0..1 and 1..3), one bar each
    assert len(bars) == 3 and all(b.closed == 1 and b.n == 100 for b in bars)
    assert sorted(len(b.shown) for b in bars) == sorted([3 + 1, 1 + 1, 2 + 1])

    # progress=True is the CLI's shorthand for a per-step tqdm meter
    bars.clear()
    res = p1(["a"], seed=1, progress=True, **kw)
    np.testing.assert_array_equal(np.asarray(res.latents), np.asarray(ref1))
    assert len(bars) == 1 and bars[0].closed == 1 and bars[0].n == 100


def test_pipeline_meter_argument_errors(pipes):
    p1, _ = pipes
    with pytest.raises(ValueError, match="progress=True or progress_meter=, not both"):
        p1(["a"], seed=1, progress=True, progress_meter=diffrax.TextProgressMeter())
    with pytest.raises(TypeError, match=r"progress_meter must be a diffrax\.AbstractProgressMeter"):
        p1(["a"], seed=1, progress_meter="tqdm")
