"""Latent previews: the projection is the least-squares fit of the model's VAE decode, it tracks the decode on
latents it was not fitted on, it is cached, and the previews sampling sends are the projected clean estimate."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from diffgen.pipelines import preview as P


def _channel_correlations(predicted: torch.Tensor, target: torch.Tensor) -> list[float]:
    a, b = predicted.reshape(-1, 3).double(), target.reshape(-1, 3).double()
    return [float(torch.corrcoef(torch.stack([a[:, c], b[:, c]]))[0, 1]) for c in range(3)]


def test_least_squares_recovers_an_affine_decoder():
    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(3, 48, 1, 10, 12, generator=generator)
    weight, bias = torch.randn(3, 48, generator=generator) * 0.1, torch.tensor([0.2, 0.5, 0.7])
    target = torch.einsum("bcfhw,oc->bfhwo", grid, weight) + bias
    fitted = P.least_squares(grid, target)
    torch.testing.assert_close(fitted.weight, weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(fitted.bias, bias, atol=1e-5, rtol=0)


def test_the_fit_minimises_the_squared_error_of_the_decode(tiny_flux):
    """Normal equations: the residual of a least-squares fit is orthogonal to every latent channel and the
    constant; so no change of the coefficients lowers the error."""
    from diffgen.engine.loading import load_model

    pipe = load_model(tiny_flux, device="cpu")
    latents = P.smooth_latents(2, P.latent_channels(pipe), 16)
    target = P.pool_to_grid(P.decode_grid(pipe, latents)[:, :1], 16, 16)
    fitted = P.least_squares(latents, target)
    residual = (target - fitted(latents)).reshape(-1, 3).double()  # no pixel is clamped on these latents
    features = torch.cat([latents[:, :, 0].permute(0, 2, 3, 1).reshape(-1, 16).double(),
                          torch.ones(residual.shape[0], 1, dtype=torch.float64)], dim=1)
    assert (features.T @ residual).abs().max() < 1e-3 * residual.shape[0] ** 0.5
    nudged = P.LatentProjection(fitted.weight + 0.01, fitted.bias)
    assert (target - nudged(latents)).pow(2).sum() > (target - fitted(latents)).pow(2).sum()


@pytest.mark.parametrize("family", ["flux", "wan22-ti2v"])  # 16 and 48 latent channels
def test_the_projection_tracks_the_decode_of_latents_it_was_not_fitted_on(tiny_checkpoint, family):
    """Random tiny VAEs are far from linear, so the bar is modest; channels in the wrong order (same
    weights, so same colour statistics) must do much worse: the fit follows what each channel means."""
    from diffgen.engine.loading import load_model

    pipe = load_model(tiny_checkpoint(family), device="cpu")
    projection = P.fit_projection(pipe)
    assert projection.channels == P.latent_channels(pipe)
    held_out = P.smooth_latents(4, projection.channels, P.FIT_GRID, seed=1)
    decoded = P.pool_to_grid(P.decode_grid(pipe, held_out)[:, :1], P.FIT_GRID, P.FIT_GRID)
    fitted = sum(_channel_correlations(projection(held_out), decoded)) / 3
    order = torch.randperm(projection.channels, generator=torch.Generator().manual_seed(0))
    shuffled = P.LatentProjection(projection.weight[:, order], projection.bias)
    wrong = sum(_channel_correlations(shuffled(held_out), decoded)) / 3
    assert fitted > 0.45 and fitted > wrong + 0.25, (fitted, wrong)


def test_the_projection_is_fitted_once_and_cached(tiny_flux, tmp_path, monkeypatch):
    from diffgen.engine.loading import load_model

    monkeypatch.setenv("DIFFGEN_CACHE_DIR", str(tmp_path))
    first = P.projection_for(load_model(tiny_flux, device="cpu"))
    assert len(list((tmp_path / "previews").glob("*.json"))) == 1

    def refit(*args, **kwargs):
        raise AssertionError("fitted again although cached")

    monkeypatch.setattr(P, "fit_projection", refit)
    again = P.projection_for(load_model(tiny_flux, device="cpu"))  # a new pipeline object: from the file
    torch.testing.assert_close(again.weight, first.weight)
    torch.testing.assert_close(again.bias, first.bias)


def test_previews_are_the_projected_clean_estimate(tiny_flux):
    """Every preview_every steps (not after the last), the projection of x0 = x_t - sigma * v, with sigma
    read from the request's own scheduler; previews reach Engine.generate's preview callback."""
    from diffgen import Engine
    from diffgen.pipelines.latents import unpack_latents

    engine = Engine.from_pretrained(tiny_flux, device="cpu")
    pipe = engine.pipeline
    seen = []
    predict = pipe.predict_noise

    def recording(state, latents, t, step):
        prediction = predict(state, latents, t, step)
        seen.append((latents.clone(), prediction.clone(), float(state.scheduler.sigmas[step]),
                     state.extras["latent_grid"]))
        return prediction

    pipe.predict_noise = recording
    previews = []
    engine.generate(["a fox", "a hen"], height=64, width=48, num_inference_steps=5, preview_every=2, seed=3,
                    preview=lambda step, total, images: previews.append((step, total, images)))
    assert [(step, total) for step, total, _ in previews] == [(2, 5), (4, 5)]
    projection = P.projection_for(pipe)
    for step, _, images in previews:
        latents, prediction, sigma, grid = seen[step - 1]
        clean = unpack_latents(latents - sigma * prediction, *grid).unsqueeze(2)
        expected = (projection(clean) * 255).round().to(torch.uint8).numpy()
        assert images.shape == (2, 1, 8, 6, 3)
        assert (images == expected).all()


def test_video_previews_have_every_latent_frame(tiny_checkpoint):
    from diffgen import Engine

    engine = Engine.from_pretrained(tiny_checkpoint("wan-t2v"), device="cpu")
    previews = []
    engine.generate("a boat", height=32, width=32, num_frames=5, num_inference_steps=2, preview_every=1, seed=0,
                    preview=lambda step, total, images: previews.append(images))
    assert len(previews) == 1 and previews[0].shape == (1, 2, 4, 4, 3)  # 5 frames -> 2 latent frames, /8 sides


def test_generate_preview_every_writes_pngs(tiny_flux, tmp_path, capsys):
    from diffgen.entrypoints.cli import main

    code = main(["generate", "--model-path", tiny_flux, "--prompt", "a red fox", "--height", "64", "--width", "32",
                 "--num-inference-steps", "4", "--preview-every", "2", "--output-path", str(tmp_path),
                 "--save-output", "--seed", "1"])
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert written == ["a_red_fox-out0-step002.png"], written
    assert Image.open(tmp_path / "previews" / written[0]).size == (4, 8)
    assert "denoising" in capsys.readouterr().err  # the step progress bar


def test_preview_every_is_checked_before_loading(tiny_flux, capsys):
    from diffgen.entrypoints.cli import main

    assert main(["generate", "--model-path", tiny_flux, "--prompt", "x", "--preview-every", "0"]) == 2
    assert "--preview-every" in capsys.readouterr().err
