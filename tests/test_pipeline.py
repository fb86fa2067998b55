"""End-to-end parity of rfmpc's pipeline with diffusers' SD3 pipeline (tiny, offline)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from _torch_fixtures import build_tiny_sd3_pipeline  # noqa: E402

from rfmpc.flow import TrajectoryState, integrate  # noqa: E402
from rfmpc.pipeline import load_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd3")
    ref = build_tiny_sd3_pipeline(folder, seed=3)
    return folder, ref


def _reference_images(ref, prompts, negative, latents_nhwc, steps, guidance, max_seq=16):
    lat = torch.from_numpy(np.asarray(latents_nhwc).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = ref(
            prompt=prompts,
            negative_prompt=negative,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=lat,
            output_type="np",
            max_sequence_length=max_seq,
            height=lat.shape[2] * 4,
            width=lat.shape[3] * 4,
        )
    return out.images


@pytest.mark.parity
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_pipeline_matches_diffusers(tiny, guidance):
    folder, ref = tiny
    pipe = load_pipeline(folder)
    prompts = ["a red circle on a blue background", "two small squares"]
    shape = pipe.latent_shape(2, 64, 48)  # non-square
    lat = jax.random.normal(jax.random.key(0), shape)
    ours = pipe(
        prompts,
        negative_prompt=["blurry", ""],
        num_inference_steps=4,
        guidance_scale=guidance,
        height=64,
        width=48,
        latents=lat,
        max_sequence_length=16,
    ).images
    theirs = _reference_images(ref, prompts, ["blurry", ""], lat, 4, guidance)
    assert ours.shape == theirs.shape == (2, 64, 48, 3)
    err = float(np.abs(ours - theirs).max())
    assert err <= 1e-3, f"max abs image difference {err:.2e}"
    assert float(np.std(theirs)) > 1e-3  # the images are not trivially flat


@pytest.mark.parity
def test_prompt_encoding_matches_diffusers(tiny):
    folder, ref = tiny
    pipe = load_pipeline(folder)
    cond, uncond = pipe.encode_prompt(["a cat", "a dog on a mat"], "ugly", max_sequence_length=16)
    with torch.no_grad():
        pe, ne, pp, npool = ref.encode_prompt(
            ["a cat", "a dog on a mat"],
            None,
            None,
            negative_prompt="ugly",
            max_sequence_length=16,
            device="cpu",
        )
    for ours, theirs in (
        (cond["embeds"], pe),
        (uncond["embeds"], ne),
        (cond["pooled"], pp),
        (uncond["pooled"], npool),
    ):
        theirs = theirs.numpy()
        assert ours.shape == theirs.shape
        err = float(np.abs(np.asarray(ours) - theirs).max() / (np.std(theirs) + 1e-12))
        assert err <= 1e-4, err


def test_states_resume_to_the_same_image(tiny):
    folder, _ = tiny
    pipe = load_pipeline(folder)
    out = pipe(
        "a red circle",
        num_inference_steps=5,
        guidance_scale=3.0,
        seed=1,
        height=32,
        width=32,
        return_states=(0, 2, 5),
        output_type="latent",
    )
    assert sorted(out.states) == [0, 2, 5]
    st = out.states[2]
    assert isinstance(st, TrajectoryState) and int(st.step) == 2
    resumed = integrate(pipe.guided_field(3.0), st)
    np.testing.assert_array_equal(np.asarray(resumed.x), np.asarray(out.latents))
    np.testing.assert_array_equal(np.asarray(out.states[5].x), np.asarray(out.latents))


def test_pipeline_bad_inputs(tiny):
    folder, _ = tiny
    pipe = load_pipeline(folder)
    with pytest.raises(ValueError, match="empty list"):
        pipe([], seed=0)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
        pipe("x", num_inference_steps=0, seed=0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        pipe("x", guidance_scale=-1.0, seed=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("x", height=30, width=32, seed=0)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("x", latents=jnp.zeros((1, 4, 4, 3)), height=32, width=32)
    with pytest.raises(ValueError, match="NaN or inf"):
        pipe("x", latents=jnp.full(pipe.latent_shape(1, 32, 32), jnp.nan), height=32, width=32)
    with pytest.raises(ValueError, match="seed=, key= or latents="):
        pipe("x", height=32, width=32)
    with pytest.raises(ValueError, match="return_states"):
        pipe("x", seed=0, num_inference_steps=3, return_states=(4,), height=32, width=32)
    with pytest.raises(ValueError, match="negative_prompt has 2 entries"):
        pipe(["a"], negative_prompt=["b", "c"], seed=0, height=32, width=32)


def test_load_pipeline_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_pipeline(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model_index\.json is missing"):
        load_pipeline(tmp_path / "x")
    (tmp_path / "x" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ValueError, match="FluxPipeline"):
        load_pipeline(tmp_path / "x")
    (tmp_path / "x" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "X"]}'
    )
    with pytest.raises(FileNotFoundError, match="component 'transformer' is missing"):
        load_pipeline(tmp_path / "x")


def test_convert_round_trip(tiny, tmp_path, capsys):
    """`rfmpc convert` output loads and generates the same images as the diffusers folder."""
    from rfmpc.cli import main

    folder, _ = tiny
    assert main(["convert", str(folder), str(tmp_path / "conv"), "--json"]) == 0
    assert '"dst"' in capsys.readouterr().out
    a, b = load_pipeline(folder), load_pipeline(tmp_path / "conv")
    lat = jax.random.normal(jax.random.key(2), a.latent_shape(1, 32, 32))
    ia = a("a red circle", num_inference_steps=3, latents=lat, height=32, width=32).images
    ib = b("a red circle", num_inference_steps=3, latents=lat, height=32, width=32).images
    np.testing.assert_array_equal(ia, ib)
    # refusing to overwrite, and a clear error on an incomplete folder
    assert main(["convert", str(folder), str(tmp_path / "conv")]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    assert main(["convert", str(bad), str(tmp_path / "out2")]) == 2
    assert "component 'transformer' is missing" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.converting").exists()
