"""Make every parameter of a tiny model observable.

Models built from configs start with norm weights of 1 and many biases of 0: any wiring mistake on
such a parameter (q and k norms swapped, a bias dropped) leaves the output unchanged, so a parity
test cannot see it. :func:`randomize_constant_parameters` perturbs every parameter tensor whose
elements are all equal; randomly initialised tensors (linear and conv weights) are already distinct.
"""

from __future__ import annotations

import zlib

import torch

#: Standard deviation of the perturbation: norm weights become about 1 +- 0.3, biases about 0 +- 0.3.
SPREAD = 0.3


@torch.no_grad()
def randomize_constant_parameters(module: torch.nn.Module, seed: int | str = 0) -> torch.nn.Module:
    """Add seeded normal noise (std :data:`SPREAD`) to every floating parameter whose elements are all equal.

    ``seed`` may be a string (e.g. the component name) so that two components built alike get different
    values. Deterministic: the same module and seed give the same parameters. Returns ``module``.
    """
    if isinstance(seed, str):
        seed = zlib.crc32(seed.encode())
    generator = torch.Generator().manual_seed(seed)
    for _, parameter in sorted(module.named_parameters(), key=lambda item: item[0]):
        if not parameter.is_floating_point() or parameter.numel() == 0:
            continue
        flat = parameter.detach().flatten()
        if torch.all(flat == flat[0]):
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_((SPREAD * noise).to(parameter.dtype))
    return module
