"""LoRA adapters on the DiT's linears: several at once, each with a scale, merged or applied per request.

Files are read as users download them. The key layouts (diffusers / PEFT, kohya ``lora_unet_*``
with ``lora_down``/``lora_up``/``alpha``, the original FLUX / Wan ``diffusion_model.*`` and
Qwen-Image layouts) are converted to diffusers module names by diffusers' own converters, the same
code its ``load_lora_weights`` runs; diffgen's DiTs use diffusers' parameter names, so a converted
key names a module of the native model directly. A layer's update is ``B @ A * alpha / rank * scale``.

- ``merged``: the updates are added into the weights (no cost per step). The touched weights are
  kept in CPU memory as they were, so changing scales recomputes from them and unloading the last
  LoRA restores them bit for bit.
- ``dynamic``: each touched linear is wrapped by a :class:`LoRALinear` that adds the active
  adapters' products in its forward; a request names the adapters (and scales) it wants, so one
  server runs different LoRAs per request without reloading. Works over any linear (fp8 included).

Own code rather than ``peft``: bit-exact unmerge needs the original weights anyway, per-request
adapter sets need a context rather than module state, and the adapters must sit on diffgen's fp8
linear too; the arithmetic is a few lines.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffgen.errors import InvalidRequestError
from diffgen.options import LORA_COMPONENTS, LORA_MODES, MAX_LORA_SCALE

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass
class LoRALayer:
    down: torch.Tensor  # A: (rank, in_features)
    up: torch.Tensor  # B: (out_features, rank)
    up_bias: torch.Tensor | None  # a bias delta (Wan "diff_b"), scaled like the product
    alpha_over_rank: float


@dataclass
class LoRAAdapter:
    name: str
    path: str
    scale: float
    component: str
    layers: dict[str, LoRALayer] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "scale": self.scale, "component": self.component,
                "layers": len(self.layers)}


#: name -> scale of the adapters the running request uses (dynamic mode); None: the loaded defaults
active_loras: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("diffgen_loras", default=None)


class LoRALinear(nn.Module):
    """A linear (plain or fp8) plus the LoRA adapters that the current request activates."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters: dict[str, LoRALayer] = {}
        self.default_scales: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        scales = active_loras.get()
        for name, scale in (self.default_scales if scales is None else scales).items():
            layer = self.adapters.get(name)
            if layer is None or scale == 0:
                continue
            # as peft: lora_B(lora_A(x)) * scaling, in the adapter's dtype
            delta = F.linear(F.linear(x.to(layer.down.dtype), layer.down), layer.up, layer.up_bias)
            out = out + delta * (scale * layer.alpha_over_rank)
        return out


_COMPONENT_SUFFIX = re.compile(r"@([A-Za-z_][A-Za-z0-9_]*)$")


def parse_lora_spec(spec: str) -> tuple[str, float, str]:
    """``PATH[:SCALE][@COMPONENT]`` (the CLI's --lora-path) -> (path, scale, component).

    ``@transformer_2`` puts the LoRA on Wan2.2's second (low-noise) expert; default: ``transformer``.
    A suffix is a component only when it is a plain word, so ``@`` elsewhere in a path stays part of it.
    """
    component = "transformer"
    if match := _COMPONENT_SUFFIX.search(spec):
        spec, component = spec[: match.start()], match.group(1)
        check_lora_component(component)
    path, _, tail = spec.rpartition(":")
    if path and tail:
        try:
            return path, float(tail), component
        except ValueError:
            pass
    return spec, 1.0, component


def check_lora_component(component: Any, field_name: str = "component") -> None:
    if component not in LORA_COMPONENTS:
        raise InvalidRequestError(field_name, f"{component!r} is not a DiT to put a LoRA on; choose one of "
                                  f"{', '.join(LORA_COMPONENTS)} (transformer_2: Wan2.2's low-noise expert)")


def check_lora_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError("name", f"{name!r}: LoRA names are 1-64 letters, digits, '_', '-' or '.', "
                                  "starting with a letter or digit")


@dataclass(frozen=True)
class LoRAChange:
    """One change to the loaded LoRAs, made the same way in every process that holds the model (the
    executors send it to their workers, between requests). Build it with the class methods: they check
    what can be checked without the model, so a bad name or scale is refused before anything is sent.

    ``action``: "load" (``path``, ``name``, ``scale``, ``component``), "set_scales" (``scales``),
    "unload" (``name``; None: all) or "sync" (``adapters``: make the loaded set exactly these rows of
    :meth:`LoRAManager.describe`, in load order; used to bring a restarted worker up to date).
    """

    action: str
    path: str | None = None
    name: str | None = None
    scale: float = 1.0
    component: str = "transformer"
    scales: tuple[tuple[str, float], ...] = ()
    adapters: tuple[tuple[tuple[str, Any], ...], ...] = ()

    @classmethod
    def load(cls, path: str, name: str | None = None, scale: float = 1.0,
             component: str = "transformer") -> LoRAChange:
        if not isinstance(path, str) or not path:
            raise InvalidRequestError("path", f"{path!r} is not a file path")
        name = Path(path).stem if name is None else name
        check_lora_name(name)
        check_lora_scale(scale)
        check_lora_component(component)
        # absolute: every worker process reads the same file, whatever its working directory
        return cls("load", path=os.path.abspath(path), name=name, scale=float(scale), component=component)

    @classmethod
    def set_scales(cls, scales: dict[str, float]) -> LoRAChange:
        if not isinstance(scales, dict) or not all(isinstance(name, str) for name in scales):
            raise InvalidRequestError("scales", "must map LoRA names to scales, e.g. {\"style\": 0.8}")
        for scale in scales.values():
            check_lora_scale(scale)
        return cls("set_scales", scales=tuple((name, float(scale)) for name, scale in scales.items()))

    @classmethod
    def unload(cls, name: str | None = None) -> LoRAChange:
        return cls("unload", name=name)

    @classmethod
    def sync(cls, adapters: list[dict[str, Any]]) -> LoRAChange:
        return cls("sync", adapters=tuple(tuple(sorted(row.items())) for row in adapters))


def apply_lora_change(pipeline: Any, change: LoRAChange) -> list[dict[str, Any]]:
    """Make ``change`` on a loaded pipeline; returns the loaded LoRAs after it (:meth:`LoRAManager.describe`).
    A change that fails (InvalidRequestError) changes nothing."""
    if pipeline.loras is None:
        if change.action in ("set_scales", "unload"):
            raise InvalidRequestError("name", "no LoRA is loaded")
        pipeline.loras = LoRAManager(pipeline)
    manager = pipeline.loras
    if change.action == "load":
        manager.load(change.path, change.name, change.scale, change.component)
    elif change.action == "set_scales":
        manager.require_loaded()
        manager.set_scales(dict(change.scales))
    elif change.action == "unload":
        manager.require_loaded()
        manager.unload(change.name)
    elif change.action == "sync":
        manager.sync([dict(row) for row in change.adapters])
    else:
        raise ValueError(f"unknown LoRA change {change.action!r}")
    return manager.describe()


def describe_loras(pipeline: Any) -> list[dict[str, Any]]:
    """The LoRAs loaded into a pipeline (empty when none)."""
    return [] if pipeline.loras is None else pipeline.loras.describe()


def _converter(pipeline: Any):
    import diffusers.loaders.lora_pipeline as lp

    name = type(pipeline).__name__
    if name.startswith("Flux"):
        return lp.FluxLoraLoaderMixin
    if name.startswith("Wan"):
        return lp.WanLoraLoaderMixin
    if name.startswith("QwenImage"):
        return lp.QwenImageLoraLoaderMixin
    raise InvalidRequestError("lora", f"LoRA is not supported for {name}")


def read_lora(path: str, name: str, scale: float, pipeline: Any, component: str = "transformer") -> LoRAAdapter:
    """Read and check a LoRA file against the pipeline's DiT; errors name what does not match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_lora_scale(scale)
    check_lora_name(name)
    check_lora_component(component)
    file = Path(path)
    if not file.is_file():
        raise InvalidRequestError("lora_path", f"{path}: no such file")
    try:
        raw = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidRequestError("lora_path", f"{path} is not a safetensors file ({e})") from None
    model = pipeline.components.get(component)
    if not isinstance(model, nn.Module):
        raise InvalidRequestError("component", f"this model has no {component} to apply {path} to")
    converter = _converter(pipeline)
    try:
        if converter.__name__.startswith("Flux"):
            state, alphas = converter.lora_state_dict(dict(raw), return_alphas=True)
            state = {**state, **(alphas or {})}
        else:
            state = converter.lora_state_dict(dict(raw))
    except Exception as e:  # diffusers' converters raise plain errors on keys they do not know
        raise InvalidRequestError("lora_path", f"{path}: its keys are not a LoRA layout diffgen reads ({e})") from None
    layers = _layers(state, model, path, component, torch.device(pipeline.device))
    return LoRAAdapter(name, str(path), scale, component, layers)


def _layers(state: dict[str, torch.Tensor], model: nn.Module, path: str, component: str,
            device: torch.device) -> dict[str, LoRALayer]:
    """Adapters on the compute device (small), whatever memory the base weights wait in (offload)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        if prefix != "transformer":
            foreign.append(key)
            continue
        for suffix in ("lora_A.weight", "lora_B.weight", "lora_B.bias", "alpha"):
            if rest.endswith("." + suffix):
                grouped.setdefault(rest[: -len(suffix) - 1], {})[suffix] = tensor
                break
        else:
            foreign.append(key)
    if foreign:
        raise InvalidRequestError("lora_path", f"{path}: keys diffgen cannot apply to the {component}: "
                                  f"{_some(foreign)} (only DiT linear layers: lora_A/lora_B)")
    if not grouped:
        raise InvalidRequestError("lora_path", f"{path}: no LoRA layers found")
    layers, problems = {}, []
    for module_name, parts in sorted(grouped.items()):
        try:
            target = model.get_submodule(module_name)
        except AttributeError:
            parent, _, leaf = module_name.rpartition(".")
            holder = _submodule(model, parent)
            fused = holder is not None and any(hasattr(holder, name) for name in ("to_qkv", "to_kv", "add_qkv"))
            problems.append(f"{module_name}: no such layer in the {component}" + (
                f" ({leaf} is fused into one projection: LoRA needs DIFFGEN_FUSE_PROJECTIONS unset)" if fused else ""))
            continue
        target = target.base if isinstance(target, LoRALinear) else target
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            problems.append(f"{module_name}: needs both lora_A and lora_B weights")
            continue
        down, up = parts["lora_A.weight"], parts["lora_B.weight"]
        in_features, out_features = getattr(target, "in_features", None), getattr(target, "out_features", None)
        if in_features is None or down.ndim != 2 or up.ndim != 2:
            problems.append(f"{module_name}: not a linear layer / not 2-D LoRA weights")
            continue
        if down.shape[1] != in_features or up.shape[0] != out_features or up.shape[1] != down.shape[0]:
            problems.append(f"{module_name}: A {tuple(down.shape)} and B {tuple(up.shape)} do not fit a "
                            f"{in_features}->{out_features} linear")
            continue
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        weight = target.weight if target.weight.is_floating_point() and target.weight.element_size() > 1 else None
        dtype = weight.dtype if weight is not None else torch.bfloat16
        layers[module_name] = LoRALayer(down.to(device, dtype), up.to(device, dtype),
                                        parts["lora_B.bias"].to(device, dtype) if "lora_B.bias" in parts else None,
                                        alpha / rank)
    if problems:
        raise InvalidRequestError("lora_path", f"{path} does not match this model: {_some(problems)}")
    return layers


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _some(items: list[str], count: int = 4) -> str:
    more = f" (and {len(items) - count} more)" if len(items) > count else ""
    return "; ".join(items[:count]) + more


def check_lora_scale(scale: Any, field_name: str = "scale") -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
        raise InvalidRequestError(field_name, f"{scale!r} is not a LoRA scale between {-MAX_LORA_SCALE:g} and "
                                  f"{MAX_LORA_SCALE:g}")


class LoRAManager:
    """The LoRAs loaded into one pipeline and how they are applied (``merged`` or ``dynamic``)."""

    def __init__(self, pipeline: Any, mode: str = "merged"):
        if mode not in LORA_MODES:
            raise InvalidRequestError("lora_mode", f"{mode!r}; choose one of {', '.join(LORA_MODES)}")
        self.pipeline = pipeline
        self.mode = mode
        self.adapters: dict[str, LoRAAdapter] = {}
        self._originals: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

    # -- public ----------------------------------------------------------------------------------
    def load(self, path: str, name: str | None = None, scale: float = 1.0, component: str = "transformer") -> str:
        name = name or Path(path).stem
        if name in self.adapters:
            raise InvalidRequestError("name", f"a LoRA named {name!r} is already loaded; unload it or pick another "
                                      "name")
        adapter = read_lora(path, name, scale, self.pipeline, component)  # checked fully before anything changes
        self._check_mergeable(adapter)
        self.adapters[name] = adapter
        self._apply()
        return name

    def sync(self, rows: list[dict[str, Any]]) -> None:
        """Make the loaded set exactly ``rows`` (``describe()`` rows, in load order). Adapters already loaded
        from the same path and component are kept; the others are read first, so a bad file changes nothing.
        Merged weights are recomputed from the originals in load order: equal bit for bit to loading them."""
        current = {a.name: a for a in self.adapters.values()}
        if [(r["name"], r["path"], r["scale"], r["component"]) for r in rows] == [
                (a.name, a.path, a.scale, a.component) for a in current.values()]:
            return
        adapters = {}
        for row in rows:
            old = current.get(row["name"])
            if old is not None and (old.path, old.component) == (row["path"], row["component"]):
                adapters[old.name] = LoRAAdapter(old.name, old.path, float(row["scale"]), old.component, old.layers)
            else:
                adapter = read_lora(row["path"], row["name"], float(row["scale"]), self.pipeline, row["component"])
                self._check_mergeable(adapter)
                adapters[adapter.name] = adapter
        self.adapters = adapters
        self._apply()

    def require_loaded(self) -> None:
        if not self.adapters:
            raise InvalidRequestError("name", "no LoRA is loaded")

    def set_scales(self, scales: dict[str, float]) -> None:
        for name, scale in scales.items():
            self._require(name, "name")
            check_lora_scale(scale)
        for name, scale in scales.items():
            self.adapters[name].scale = float(scale)
        self._apply()

    def unload(self, name: str | None = None) -> None:
        if name is None:
            self.adapters.clear()
        else:
            self._require(name, "name")
            del self.adapters[name]
        self._apply()

    def describe(self) -> list[dict[str, Any]]:
        return [adapter.describe() for adapter in self.adapters.values()]

    def check_request(self, loras: dict[str, float] | None) -> None:
        """A request's own adapter set: dynamic mode only; names loaded; scales in range."""
        if loras is None:
            return
        if self.mode != "dynamic":
            raise InvalidRequestError("loras", "choosing LoRAs per request needs --lora-mode dynamic; this engine "
                                      "merges them (set them with set_lora_scales)")
        for name, scale in loras.items():
            self._require(name, "loras")
            check_lora_scale(scale, "loras")

    @contextlib.contextmanager
    def activated(self, loras: dict[str, float] | None) -> Iterator[None]:
        token = active_loras.set(None if loras is None else dict(loras))
        try:
            yield
        finally:
            active_loras.reset(token)

    # -- internals -------------------------------------------------------------------------------
    def _require(self, name: str, field_name: str) -> None:
        if name not in self.adapters:
            loaded = ", ".join(self.adapters) or "none"
            raise InvalidRequestError(field_name, f"no LoRA named {name!r} is loaded (loaded: {loaded})")

    def _check_mergeable(self, adapter: LoRAAdapter) -> None:
        if self.mode == "merged" and any(_is_fp8(self._linear(adapter.component, m)) for m in adapter.layers):
            raise InvalidRequestError("lora_mode", "merged LoRA cannot change fp8 weights; use --lora-mode dynamic")

    def _linear(self, component: str, module_name: str) -> nn.Module:
        module = self.pipeline.components[component].get_submodule(module_name)
        return module.base if isinstance(module, LoRALinear) else module

    def _apply(self) -> None:
        for offloader in getattr(self.pipeline, "offloaders", ()):
            if hasattr(offloader, "evict_all"):  # merge into the stored copies, not a streamed-in one
                offloader.evict_all()
        if self.mode == "merged":
            self._merge()
        else:
            self._wrap()

    def _merge(self) -> None:
        """Weights = originals + every loaded adapter's update, in load order (as peft merges them)."""
        wanted = {(a.component, m) for a in self.adapters.values() for m in a.layers}
        for key in list(self._originals):
            if key not in wanted:  # no adapter touches it any more: exactly the original
                weight, bias = self._originals.pop(key)
                linear = self._linear(*key)
                linear.weight.data.copy_(weight)
                if bias is not None:
                    linear.bias.data.copy_(bias)
        for key in sorted(wanted):
            linear = self._linear(*key)
            if key not in self._originals:
                self._originals[key] = (linear.weight.detach().to("cpu", copy=True),
                                        None if linear.bias is None else linear.bias.detach().to("cpu", copy=True))
            weight, bias = self._originals[key]
            weight = weight.to(linear.weight.device, copy=True)
            bias = None if bias is None else bias.to(linear.weight.device, copy=True)
            for adapter in self.adapters.values():
                layer = adapter.layers.get(key[1])
                if adapter.component != key[0] or layer is None:
                    continue
                scaling = adapter.scale * layer.alpha_over_rank
                weight += (layer.up.to(weight.device) @ layer.down.to(weight.device)) * scaling
                if layer.up_bias is not None:
                    if bias is None:
                        raise InvalidRequestError("lora_path", f"{adapter.path}: {key[1]} has no bias to update")
                    bias += layer.up_bias.to(bias.device) * scaling
            linear.weight.data.copy_(weight)
            if bias is not None:
                linear.bias.data.copy_(bias)

    def _wrap(self) -> None:
        """Each targeted linear wrapped once; adapters and default scales refreshed; unused wrappers removed."""
        wanted: dict[tuple[str, str], dict[str, LoRALayer]] = {}
        for adapter in self.adapters.values():
            for module_name, layer in adapter.layers.items():
                wanted.setdefault((adapter.component, module_name), {})[adapter.name] = layer
        for component in {c for c in self.pipeline.components if c.startswith("transformer")}:
            model = self.pipeline.components[component]
            if not isinstance(model, nn.Module):
                continue
            for module_name, module in list(model.named_modules()):
                if isinstance(module, LoRALinear) and (component, module_name) not in wanted:
                    _replace(model, module_name, module.base)
        for (component, module_name), layers in wanted.items():
            model = self.pipeline.components[component]
            module = model.get_submodule(module_name)
            if not isinstance(module, LoRALinear):
                module = LoRALinear(module)
                _replace(model, module_name, module)
            module.adapters = dict(layers)
            module.default_scales = {name: self.adapters[name].scale for name in layers}


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, attr = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _is_fp8(linear: nn.Module) -> bool:
    return linear.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
