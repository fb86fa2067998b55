"""The offline fixtures: reproducible tokenizers, non-trivial random weights, and a tiny SD3
pipeline that round-trips through save_pretrained / from_pretrained and loads into rfmpc."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from _torch_fixtures import (  # noqa: E402
    build_tiny_sd3_pipeline,
    randomize_,
    tiny_vae,
    train_clip_tokenizer,
    train_t5_tokenizer,
)

from weights_conversion.clip import load_clip_text  # noqa: E402
from weights_conversion.t5 import load_t5_encoder  # noqa: E402
from weights_conversion.vae import load_vae  # noqa: E402

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd3")
    return folder, build_tiny_sd3_pipeline(folder, seed=0)


def _digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".safetensors", ".json") and "config" not in p.name
    }


def test_pipeline_round_trips_offline_with_sd3_sizes(tiny_pipe):
    folder, pipe = tiny_pipe
    assert isinstance(pipe, diffusers.StableDiffusion3Pipeline)
    # weights and tokenizers are safetensors / JSON only: no pickles
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json", ".txt") for p in files), files
    reloaded = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    for name in COMPONENTS:
        a, b = getattr(pipe, name).state_dict(), getattr(reloaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    t = pipe.transformer.config
    l_cfg, g_cfg, t5_cfg = (
        pipe.text_encoder.config,
        pipe.text_encoder_2.config,
        pipe.text_encoder_3.config,
    )
    assert l_cfg.hidden_act == "quick_gelu" and g_cfg.hidden_act == "gelu"
    assert l_cfg.eos_token_id == 2  # legacy pooling rule, as SD3's CLIP-L config
    assert g_cfg.eos_token_id == pipe.tokenizer_2.eos_token_id
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.model_max_length == 77
    assert l_cfg.hidden_size + g_cfg.hidden_size < t5_cfg.d_model == t.joint_attention_dim
    assert l_cfg.projection_dim + g_cfg.projection_dim == t.pooled_projection_dim
    assert pipe.vae.config.latent_channels == t.in_channels == 16
    assert pipe.vae.config.use_quant_conv is False and pipe.vae.config.shift_factor == 0.0609

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            ["a red circle", "two small squares"],
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=16,
        )
    assert tuple(embeds.shape) == (2, 77 + 16, t.joint_attention_dim)
    assert tuple(pooled.shape) == (2, t.pooled_projection_dim)
    # CLIP features fill the first 80 columns of the CLIP rows, zero padding the rest
    clip_rows = embeds[:, :77].numpy()
    assert np.all(clip_rows[..., 80:] == 0) and np.abs(clip_rows[..., :80]).min() > 0


def test_pipeline_generates_offline(tiny_pipe):
    _, pipe = tiny_pipe
    with torch.no_grad():
        out = pipe(
            "a red circle",
            num_inference_steps=2,
            guidance_scale=3.0,
            max_sequence_length=16,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
    img = out.images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all() and img.std() > 0.01


def test_pipeline_folders_load_into_rfmpc(tiny_pipe):
    """Every component folder maps key-for-key onto our modules (strict loaders)."""
    folder, pipe = tiny_pipe
    vae = load_vae(folder / "vae")
    clip_l = load_clip_text(folder / "text_encoder")
    clip_g = load_clip_text(folder / "text_encoder_2")
    t5 = load_t5_encoder(folder / "text_encoder_3")
    assert vae.config.latent_channels == 16 and vae.config.downsample_factor == 4
    assert clip_l.config.eos_token_id == 2
    assert clip_g.config.projection_dim == pipe.text_encoder_2.config.projection_dim
    ref = pipe.text_encoder_3.shared.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(t5.shared.embedding[...]), ref)


def test_pipeline_is_reproducible_and_seeded(tiny_pipe, tmp_path):
    folder, _ = tiny_pipe
    build_tiny_sd3_pipeline(tmp_path / "same", seed=0)
    assert _digest(tmp_path / "same") == _digest(folder)
    build_tiny_sd3_pipeline(tmp_path / "other", seed=1)
    a, b = _digest(tmp_path / "other"), _digest(folder)
    assert (
        a["transformer/diffusion_pytorch_model.safetensors"]
        != b["transformer/diffusion_pytorch_model.safetensors"]
    )
    assert a["tokenizer/tokenizer.json"] == b["tokenizer/tokenizer.json"]


def test_pipeline_without_t5(tmp_path):
    pipe = build_tiny_sd3_pipeline(tmp_path / "no_t5", seed=0, with_t5=False)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            "a red circle", None, None, do_classifier_free_guidance=False, max_sequence_length=8
        )
    assert tuple(embeds.shape) == (1, 77 + 8, 96) and tuple(pooled.shape) == (1, 80)
    assert np.all(embeds[:, 77:].numpy() == 0)  # diffusers' zeros stand in for T5


def test_tokenizers_are_deterministic_and_sd3_like(tmp_path):
    tok, tok_again = train_clip_tokenizer(), train_clip_tokenizer()
    assert tok.backend_tokenizer.to_str() == tok_again.backend_tokenizer.to_str()
    v = len(tok)
    assert (tok.bos_token_id, tok.eos_token_id) == (v - 2, v - 1)  # largest ids, as OpenAI's
    ids = tok("a red circle on a blue background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [
        "a</w>",
        "red</w>",
        "circle</w>",
        "on</w>",
        "a</w>",
        "blue</w>",
        "background</w>",
    ]
    assert tok.unk_token_id not in tok("Zebras & quokkas, 42!").input_ids[1:-1]

    t5 = train_t5_tokenizer()
    assert t5.backend_tokenizer.to_str() == train_t5_tokenizer().backend_tokenizer.to_str()
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    ids = t5("a red circle").input_ids
    assert t5.convert_ids_to_tokens(ids) == ["▁a", "▁red", "▁circle", "</s>"]
    assert t5.unk_token_id not in t5("Zebras & quokkas, 42!").input_ids

    tok.save_pretrained(tmp_path / "clip")
    t5.save_pretrained(tmp_path / "t5")
    transformers = pytest.importorskip("transformers")
    text = ["Two zebras & 3 quick foxes jump!"]
    back = transformers.CLIPTokenizer.from_pretrained(tmp_path / "clip", local_files_only=True)
    assert back(text).input_ids == tok(text).input_ids
    back5 = transformers.T5TokenizerFast.from_pretrained(tmp_path / "t5", local_files_only=True)
    assert back5(text).input_ids == t5(text).input_ids


def test_randomize_gives_nontrivial_deterministic_weights():
    a, b, c = tiny_vae(seed=0), tiny_vae(seed=0), tiny_vae(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["encoder.conv_in.weight"], sc["encoder.conv_in.weight"])
    norm, bias = sa["encoder.mid_block.resnets.0.norm1.weight"], sa["encoder.conv_in.bias"]
    assert (norm - 1).abs().mean() > 0.05 and bias.abs().mean() > 0.05
    w = sa["decoder.conv_out.weight"]  # N(0, 1) / sqrt(fan_in)
    assert 0.5 < float(w.std() * np.sqrt(np.prod(w.shape[1:]))) < 1.5
    assert randomize_(torch.nn.Linear(3, 2), 0).bias.abs().sum() > 0
