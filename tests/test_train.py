"""The rectified-flow trainer: loss goes down, checkpoints resume exactly, export loads."""

import json

import jax
import numpy as np
import pytest

from rfmpc.io import load_safetensors
from rfmpc.train import TrainConfig, export_transformer, train


class _FakeEncoder:
    """A fixed random embedding per word: deterministic, instant, enough to test the loop."""

    seq_dim = 16
    pooled_dim = 8

    def encode(self, prompts):
        out_s, out_p = [], []
        for p in prompts:
            rng = np.random.default_rng(abs(hash(p)) % (2**32))
            out_s.append(rng.standard_normal((6, self.seq_dim)).astype(np.float32))
            out_p.append(rng.standard_normal(self.pooled_dim).astype(np.float32))
        return jax.numpy.asarray(np.stack(out_s)), jax.numpy.asarray(np.stack(out_p))


TINY = TrainConfig(
    steps=6,
    batch_size=4,
    num_layers=1,
    num_heads=2,
    head_dim=8,
    patch_size=8,
    checkpoint_every=3,
    log_every=1,
    warmup_steps=2,
    learning_rate=3e-3,
)


def _params(run):
    tensors, header = load_safetensors(run / "checkpoint.safetensors")
    return int(header["step"]), {k: v for k, v in tensors.items() if k.startswith("params.")}


def test_interrupted_training_resumes_exactly(tmp_path):
    enc = _FakeEncoder()
    full = train(tmp_path / "full", TINY, encoder=enc, progress=False)
    assert full["finished"] and full["steps_done"] == 6
    part = train(tmp_path / "part", TINY, encoder=enc, progress=False, stop_after=2)
    assert not part["finished"] and part["steps_done"] == 2
    rest = train(tmp_path / "part", TINY, encoder=enc, progress=False)
    assert rest["finished"] and rest["steps_done"] == 6
    step_a, pa = _params(tmp_path / "full")
    step_b, pb = _params(tmp_path / "part")
    assert step_a == step_b == 6
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "full" / "loss.png").is_file()


def test_loss_decreases(tmp_path):
    cfg = TrainConfig(
        steps=40,
        batch_size=8,
        num_layers=1,
        num_heads=2,
        head_dim=16,
        patch_size=8,
        checkpoint_every=40,
        log_every=10,
        warmup_steps=5,
        learning_rate=3e-3,
    )
    out = train(tmp_path, cfg, encoder=_FakeEncoder(), progress=False)
    losses = [h["loss"] for h in out["history"]]
    assert losses[-1] < 0.8 * losses[0], losses


def test_resume_with_other_config_is_refused(tmp_path):
    enc = _FakeEncoder()
    train(tmp_path, TINY, encoder=enc, progress=False, stop_after=1)
    other = TrainConfig(**{**TINY.__dict__, "learning_rate": 1e-2})
    with pytest.raises(ValueError, match="different TrainConfig"):
        train(tmp_path, other, encoder=enc, progress=False)


def test_export_loads_as_transformer(tmp_path):
    from rfmpc.models import load_transformer

    enc = _FakeEncoder()
    train(tmp_path / "run", TINY, encoder=enc, progress=False)
    dest = export_transformer(tmp_path / "run", tmp_path / "exported")
    tr = load_transformer(dest)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    seq, pooled = enc.encode(["a", "b"])
    v = tr(x, 500.0, seq, pooled)
    assert v.shape == x.shape and bool(jax.numpy.all(jax.numpy.isfinite(v)))


def test_bad_config():
    with pytest.raises(ValueError, match="sigma_sampling"):
        TrainConfig(sigma_sampling="cosine")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
