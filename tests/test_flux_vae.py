"""diffgen's AutoencoderKL (FLUX's VAE) against diffusers' on the same weights (float32, CPU): decode and encode
equal, strict loading, the fallbacks to diffusers' class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffgen.errors import ModelLoadError
from diffgen.loader.components import load_pipeline
from diffgen.loader.weights import load_native_model
from diffgen.models.vaes import NATIVE_VAE_ENV
from diffgen.models.vaes.autoencoder_kl import AutoencoderKL
from diffgen.pipelines.flux import FluxPipeline
from diffgen.testing.randomize import randomize_constant_parameters

# A wider cousin of the tiny FLUX VAE: two resnets per block, quant convs on, channel changes in both directions.
WIDER = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
             sample_size=32, scaling_factor=0.5, shift_factor=None, use_quant_conv=True, use_post_quant_conv=True)


def write_diffusers_vae(folder: Path, **config) -> Path:
    """A random diffusers AutoencoderKL saved as the hub stores it (norm weights and biases randomized too)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(0)
    vae = DiffusersAutoencoderKL(**config)
    randomize_constant_parameters(vae)
    vae.save_pretrained(folder)
    return folder


def load_native(folder: Path) -> AutoencoderKL:
    return load_native_model(AutoencoderKL, folder, torch.float32, "cpu")


@pytest.fixture(scope="module", params=["tiny-flux", "wider"])
def vae_pair(request, tiny_flux, tmp_path_factory):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    if request.param == "tiny-flux":
        folder = Path(tiny_flux) / "vae"
    else:
        folder = write_diffusers_vae(tmp_path_factory.mktemp("vae") / "vae", **WIDER)
    reference = DiffusersAutoencoderKL.from_pretrained(folder, dtype=torch.float32).eval()
    return load_native(folder), reference


def test_decode_equals_diffusers(vae_pair):
    ours, reference = vae_pair
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(2, ours.config.latent_channels, 6, 10, generator=generator)  # batch 2, not square
    with torch.inference_mode():
        mine = ours.decode(z, return_dict=False)[0]
        theirs = reference.decode(z, return_dict=False)[0]
        assert torch.equal(ours.decode(z).sample, mine)
    assert mine.shape == theirs.shape == (2, 3, 6 * 2 ** (len(ours.config.block_out_channels) - 1),
                                          10 * 2 ** (len(ours.config.block_out_channels) - 1))
    assert torch.equal(mine, theirs)  # every operation in diffusers' order: bit for bit in float32


def test_encode_equals_diffusers(vae_pair):
    ours, reference = vae_pair
    x = torch.rand(2, 3, 48, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        mine, theirs = ours.encode(x).latent_dist, reference.encode(x).latent_dist
        assert torch.equal(mine.mean, theirs.mean) and torch.equal(mine.std, theirs.std)
        assert torch.equal(mine.mode(), theirs.mode())
        draw = [dist.sample(torch.Generator().manual_seed(3)) for dist in (mine, theirs)]
        assert torch.equal(*draw)
        assert torch.equal(ours.encode(x, return_dict=False)[0].mean, mine.mean)


def test_config_reads_as_diffusers_config(vae_pair):
    ours, reference = vae_pair
    for key in ("scaling_factor", "shift_factor", "block_out_channels", "latent_channels", "sample_size",
                "use_post_quant_conv", "force_upcast"):
        assert getattr(ours.config, key) == pytest.approx(getattr(reference.config, key)), key
        assert ours.config.get(key) == ours.config[key] == getattr(ours.config, key)
    assert ours.config.get("z_dim") is None and "latent_channels" in dict(ours.config)
    assert ours.dtype == torch.float32 and ours.device == torch.device("cpu")
    assert ours.state_dict().keys() == reference.state_dict().keys()


def _copy_with_state(source: Path, target: Path, state: dict[str, torch.Tensor]) -> Path:
    target.mkdir(parents=True)
    shutil.copy(source / "config.json", target / "config.json")
    save_file(state, str(target / "diffusion_pytorch_model.safetensors"))
    return target


def test_loading_is_strict(tiny_flux, tmp_path):
    folder = Path(tiny_flux) / "vae"
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    missing = dict(state)
    del missing["decoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(ModelLoadError, match=r"missing keys \[decoder\.mid_block\.attentions\.0\.to_q\.weight\]; "
                                             r"unexpected keys \[\]"):
        load_native(_copy_with_state(folder, tmp_path / "missing", missing))
    renamed = dict(state)  # the deprecated attention names of old checkpoints: listed, not guessed
    renamed["decoder.mid_block.attentions.0.query.weight"] = renamed.pop("decoder.mid_block.attentions.0.to_q.weight")
    with pytest.raises(ModelLoadError, match=r"missing keys \[decoder\.mid_block\.attentions\.0\.to_q\.weight\]; "
                                             r"unexpected keys \[decoder\.mid_block\.attentions\.0\.query\.weight\]"):
        load_native(_copy_with_state(folder, tmp_path / "renamed", renamed))


def test_flux_pipeline_loads_the_native_vae_and_falls_back_when_asked(tiny_flux, monkeypatch, tmp_path):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    assert isinstance(load_pipeline(tiny_flux, device="cpu", dtype="float32").vae, AutoencoderKL)
    monkeypatch.setenv(NATIVE_VAE_ENV, "0")
    assert isinstance(load_pipeline(tiny_flux, device="cpu", dtype="float32").vae, DiffusersAutoencoderKL)
    monkeypatch.delenv(NATIVE_VAE_ENV)
    # a config the native class does not build (another activation) loads diffusers' class, with a log line
    checkpoint = Path(shutil.copytree(tiny_flux, tmp_path / "ckpt"))
    config_file = checkpoint / "vae" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "act_fn": "gelu"}))
    assert not AutoencoderKL.accepts(checkpoint / "vae")
    assert isinstance(load_pipeline(str(checkpoint), device="cpu", dtype="float32").vae, DiffusersAutoencoderKL)
    assert FluxPipeline.native_models["AutoencoderKL"] is AutoencoderKL


def test_vae_dtype_override_keeps_the_native_class(tiny_flux):
    pipeline = load_pipeline(tiny_flux, device="cpu", dtype="bfloat16", vae_dtype="float32")
    assert isinstance(pipeline.vae, AutoencoderKL) and pipeline.vae.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in pipeline.vae.parameters())
