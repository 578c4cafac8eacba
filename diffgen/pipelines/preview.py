"""Cheap previews: latents -> RGB by one linear map per model, fitted once against the model's own VAE.

A VAE latent pixel mostly carries the colour of the patch it decodes to, so an affine map from the C
latent channels to RGB (C x 3 weights and 3 biases) gives a recognisable thumbnail at the latent grid's
size for the cost of one small matrix product, with no VAE decode. The coefficients are not published
values: they are the least-squares fit of the VAE's own decode (through the pipeline's ``decode``, so in
the DiT's normalised latent units) of smooth random latents, each decoded image average-pooled to the
latent grid. The fit is computed once per VAE and kept as JSON in ``$DIFFGEN_CACHE_DIR/previews``, keyed
by a fingerprint of the VAE's config and weights. It serves every family alike (FLUX 16 channels,
Qwen-Image and Wan2.1 16, Wan2.2-TI2V 48, HunyuanVideo 16).

What is projected during sampling is the flow-matching estimate of the clean latents, not the noisy
sample: with ``x_t = (1 - sigma) x0 + sigma * noise`` and the prediction ``v = noise - x0``,
``x0 = x_t - sigma * v`` (sigma = timestep / num_train_timesteps), which shows the picture from the
first steps on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffgen.pipelines.base import ComposedPipeline, PipelineState

logger = logging.getLogger(__name__)

FIT_GRID = 32  # latent side of the fit's samples (256 px images at a scale factor of 8)
FIT_SAMPLES = 4
FIT_SMOOTHNESS = 4  # the random latents vary over ~FIT_GRID / FIT_SMOOTHNESS latent pixels, as pictures do
FIT_VERSION = 1  # bump when the fitting procedure changes: cached fits of another version are refitted


@dataclass(frozen=True)
class LatentProjection:
    """``rgb = weight @ latent + bias`` per latent pixel; rgb in [0, 1]."""

    weight: torch.Tensor  # (3, C)
    bias: torch.Tensor  # (3,)

    @property
    def channels(self) -> int:
        return self.weight.shape[1]

    def __call__(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, C, F, h, w) latents -> (B, F, h, w, 3) float RGB in [0, 1]."""
        weight, bias = self.weight.to(grid.device), self.bias.to(grid.device)
        rgb = torch.einsum("bcfhw,oc->bfhwo", grid.float(), weight) + bias
        return rgb.clamp(0, 1)

    def to_json(self) -> dict[str, Any]:
        return {"version": FIT_VERSION, "weight": self.weight.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatentProjection:
        return cls(torch.tensor(data["weight"], dtype=torch.float32), torch.tensor(data["bias"], dtype=torch.float32))


def latent_channels(pipe: ComposedPipeline) -> int:
    config = pipe.vae.config
    return int(config.get("latent_channels") or config["z_dim"])


def smooth_latents(samples: int, channels: int, grid: int, seed: int = 0) -> torch.Tensor:
    """Unit-variance random latents (samples, C, 1, grid, grid) that vary smoothly over the grid, like
    the latents of pictures (white noise would decode to texture, far from what sampling ends at)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    coarse = torch.randn(samples, channels, FIT_SMOOTHNESS, FIT_SMOOTHNESS, generator=generator)
    fine = F.interpolate(coarse, size=(grid, grid), mode="bicubic", align_corners=False)
    fine = fine + 0.25 * torch.randn(fine.shape, generator=generator)
    fine = (fine - fine.mean(dim=(2, 3), keepdim=True)) / fine.std(dim=(2, 3), keepdim=True)
    return fine.unsqueeze(2)


def decode_grid(pipe: ComposedPipeline, grid: torch.Tensor) -> torch.Tensor:
    """The pipeline's own decode of (B, C, 1, h, w) latents in the DiT's units: (B, F, H, W, 3) in [0, 1]."""
    from diffgen.engine.request import GenerationRequest
    from diffgen.pipelines.base import PipelineState

    # Only the VAE's tiling choice reads the size: small here, so never tiled.
    request = GenerationRequest(prompt=["preview fit"], height=grid.shape[-2] * 8, width=grid.shape[-1] * 8,
                                num_frames=1, num_outputs_per_prompt=grid.shape[0])
    state = PipelineState(request=request, device=pipe.device, dtype=pipe.dtype, seed=0)
    state.latents = pipe.grid_to_latents(state, grid.to(pipe.device))
    with torch.inference_mode():
        pipe.decode(state)
    pixels = state.pixels
    return pixels if pixels.ndim == 5 else pixels.unsqueeze(1)


def pool_to_grid(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, F, H, W, 3) -> (B, F, height, width, 3): each latent pixel's patch averaged."""
    b, f, h, w, _ = pixels.shape
    flat = pixels.permute(0, 1, 4, 2, 3).reshape(b * f, 3, h, w)
    pooled = F.adaptive_avg_pool2d(flat.float(), (height, width))
    return pooled.reshape(b, f, 3, height, width).permute(0, 1, 3, 4, 2)


def least_squares(grid: torch.Tensor, target: torch.Tensor) -> LatentProjection:
    """The affine map from (B, C, 1, h, w) latents to (B, 1, h, w, 3) colours with the least squared error."""
    channels = grid.shape[1]
    x = grid[:, :, 0].permute(0, 2, 3, 1).reshape(-1, channels).double()
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    y = target[:, 0].reshape(-1, 3).double()
    solution = torch.linalg.lstsq(x, y, driver="gelsd").solution  # (C + 1, 3)
    return LatentProjection(solution[:channels].T.float().contiguous(), solution[channels].float().contiguous())


def fit_projection(pipe: ComposedPipeline, samples: int = FIT_SAMPLES, grid: int = FIT_GRID,
                   seed: int = 0) -> LatentProjection:
    """Fit the preview projection of ``pipe`` against its VAE (see the module docstring)."""
    latents = smooth_latents(samples, latent_channels(pipe), grid, seed)
    pixels = decode_grid(pipe, latents)[:, :1].cpu()  # a one-latent-frame video decodes to one frame
    return least_squares(latents, pool_to_grid(pixels, grid, grid))


def vae_fingerprint(pipe: ComposedPipeline) -> str:
    """Names, shapes and sums of the VAE's weights and its config: another VAE, another fit."""
    digest = hashlib.sha256(json.dumps(dict(pipe.vae.config), sort_keys=True, default=str).encode())
    digest.update(f"v{FIT_VERSION} {type(pipe).__name__}".encode())
    with torch.inference_mode():
        for name, tensor in pipe.vae.state_dict().items():
            sums = torch.stack([tensor.float().sum(), tensor.float().abs().sum()]).tolist()
            digest.update(f"{name}{tuple(tensor.shape)}{sums[0]:.6e}{sums[1]:.6e}".encode())
    return digest.hexdigest()[:32]


_LOCK = threading.Lock()


def projection_for(pipe: ComposedPipeline) -> LatentProjection:
    """The pipeline's preview projection: in memory, else from the cache folder, else fitted (and saved)."""
    with _LOCK:
        found = pipe.__dict__.get("_preview_projection")
        if found is not None:
            return found
        from diffgen.engine.optimize import cache_dir

        path = cache_dir() / "previews" / f"{vae_fingerprint(pipe)}.json"
        projection = None
        try:
            data = json.loads(path.read_text())
            if data.get("version") == FIT_VERSION:
                projection = LatentProjection.from_json(data)
        except (OSError, ValueError, KeyError):
            pass
        if projection is None:
            projection = fit_projection(pipe)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                temp = path.with_suffix(f".{threading.get_ident()}.tmp")
                temp.write_text(json.dumps(projection.to_json()))
                temp.replace(path)
            except OSError as e:  # a read-only cache only costs a refit next time
                logger.warning("cannot cache the preview projection in %s: %s", path, e)
        pipe.__dict__["_preview_projection"] = projection
        return projection


def clean_estimate(latents: torch.Tensor, prediction: torch.Tensor, timestep: torch.Tensor,
                   scheduler: Any) -> torch.Tensor:
    """x0 = x_t - sigma * v (flow matching, see the module docstring)."""
    config = getattr(scheduler, "config", None)
    train_steps = getattr(config, "num_train_timesteps", None) or 1000  # every model here trains on 1000
    sigma = float(timestep.flatten()[0]) / train_steps
    return latents - sigma * prediction.to(latents.dtype)


def preview_images(pipe: ComposedPipeline, state: PipelineState, latents: torch.Tensor) -> np.ndarray:
    """(B, F, h, w, 3) uint8 previews of ``latents`` (in the pipeline's layout) at the latent grid's size."""
    rgb = projection_for(pipe)(pipe.latents_to_grid(state, latents))
    return (rgb * 255).round().to(torch.uint8).cpu().numpy()


def wants_preview(every: int | None, step: int, total: int) -> bool:
    """A preview after step ``step`` (1-based) of ``total``: every ``every`` steps, not after the last
    (the result follows at once)."""
    return bool(every) and step % every == 0 and step < total

