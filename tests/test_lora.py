"""LoRA: files in the layouts users download, merged and dynamic, against diffusers' load_lora_weights.

Each test writes a tiny LoRA for the tiny checkpoint's real layer shapes, in one key layout:
diffusers/PEFT keys, kohya (FLUX: BFL block names, lora_down/lora_up/alpha), the original Wan
``diffusion_model.*`` layout, and Qwen-Image's ``diffusion_model.*`` layout with alphas.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffgen import Engine
from diffgen.engine.lora import parse_lora_spec
from diffgen.errors import InvalidRequestError

PROMPT = "a castle on a hill"
SAMPLING = {
    "flux": dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16),
    "wan-t2v": dict(height=32, width=32, num_frames=5, num_inference_steps=2, max_sequence_length=16,
                    negative_prompt="bad"),
    "qwen-image": dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, negative_prompt="bad"),
}
RANK = 4


def _pair(linear: torch.nn.Module, seed: int, alpha: float | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(RANK, linear.in_features, generator=generator) * 0.3
    up = torch.randn(linear.out_features, RANK, generator=generator) * 0.3
    return {"down": down, "up": up, **({"alpha": torch.tensor(alpha)} if alpha is not None else {})}


# layout -> (family, [(diffusers module name, key stem in the file)], down name, up name, with alpha)
LAYOUTS = {
    "flux-peft": ("flux", [("transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_q"),
                           ("single_transformer_blocks.0.proj_mlp", "transformer.single_transformer_blocks.0.proj_mlp"),
                           ("transformer_blocks.0.ff.net.2", "transformer.transformer_blocks.0.ff.net.2")],
                  "lora_A.weight", "lora_B.weight", False),
    "flux-kohya": ("flux", [("transformer_blocks.0.attn.to_out.0", "lora_unet_double_blocks_0_img_attn_proj"),
                            ("single_transformer_blocks.0.proj_out", "lora_unet_single_blocks_0_linear2")],
                   "lora_down.weight", "lora_up.weight", True),
    "wan-original": ("wan-t2v", [("blocks.0.attn1.to_q", "diffusion_model.blocks.0.self_attn.q"),
                                 ("blocks.1.attn2.to_v", "diffusion_model.blocks.1.cross_attn.v"),
                                 ("blocks.0.ffn.net.0.proj", "diffusion_model.blocks.0.ffn.0")],
                     "lora_A.weight", "lora_B.weight", False),
    "qwen-original": ("qwen-image", [("transformer_blocks.0.attn.to_q",
                                      "diffusion_model.transformer_blocks.0.attn.to_q"),
                                     ("transformer_blocks.1.img_mlp.net.2",
                                      "diffusion_model.transformer_blocks.1.img_mlp.net.2")],
                      "lora_down.weight", "lora_up.weight", True),
}


def write_lora(path, engine: Engine, layout: str, seed: int = 0) -> str:
    _, targets, down_name, up_name, with_alpha = LAYOUTS[layout]
    tensors = {}
    for i, (module_name, stem) in enumerate(targets):
        pair = _pair(engine.pipeline.transformer.get_submodule(module_name), seed * 100 + i,
                     alpha=2.0 if with_alpha else None)
        tensors[f"{stem}.{down_name}"] = pair["down"]
        tensors[f"{stem}.{up_name}"] = pair["up"]
        if with_alpha:
            tensors[f"{stem}.alpha"] = pair["alpha"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    made: dict[tuple[str, str], Engine] = {}

    def get(family: str, mode: str = "merged") -> Engine:
        if (family, mode) not in made:
            made[family, mode] = Engine.from_pretrained(tiny_checkpoint(family), device="cpu", dtype="float32",
                                                        lora_mode=mode)
        return made[family, mode]

    return get


def _latents(engine: Engine, family: str, **kwargs) -> torch.Tensor:
    return engine.generate(PROMPT, seed=5, return_tensors=True, **{**SAMPLING[family], **kwargs}).latents


def _reference(path: str, family: str, lora_files: list[tuple[str, float]]) -> torch.Tensor:
    import diffusers

    name = json.load(open(f"{path}/model_index.json"))["_class_name"]
    pipe = getattr(diffusers, name).from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for tensor in [*pipe.transformer.parameters(), *pipe.transformer.buffers()]:
        tensor.data = tensor.data.clone()  # aligned like ours: see tests/test_wan.py
    names = []
    for i, (file, _) in enumerate(lora_files):
        pipe.load_lora_weights(file, adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, [scale for _, scale in lora_files])
    kwargs = dict(SAMPLING[family])
    if family == "qwen-image":
        kwargs["true_cfg_scale"] = 4.0
    return pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(5), output_type="latent", **kwargs)[0]


def _weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.pipeline.transformer.state_dict().items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merged_matches_diffusers_and_unloads_exactly(engines, tiny_checkpoint, tmp_path, layout):
    family = LAYOUTS[layout][0]
    pytest.importorskip("peft", reason="diffusers' load_lora_weights (the reference) needs peft")
    engine = engines(family)
    before = _weights(engine)
    plain = _latents(engine, family)
    file = write_lora(tmp_path / f"{layout}.safetensors", engine, layout)
    name = engine.load_lora(file, scale=0.8)
    try:
        ours = _latents(engine, family)
        expected = _reference(tiny_checkpoint(family), family, [(file, 0.8)])
        torch.testing.assert_close(ours, expected.reshape(ours.shape), atol=1e-5, rtol=0)
        assert (ours - plain).abs().max() > 1e-3  # the LoRA changes the output well beyond the tolerance
    finally:
        engine.unload_lora(name)
    after = _weights(engine)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact
    assert torch.equal(_latents(engine, family), plain)


def test_two_loras_with_scales_merged_and_dynamic(engines, tiny_checkpoint, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights (the reference) needs peft")
    family = "flux"
    merged, dynamic = engines(family), engines(family, "dynamic")
    a = write_lora(tmp_path / "a.safetensors", merged, "flux-peft", seed=1)
    b = write_lora(tmp_path / "b.safetensors", merged, "flux-kohya", seed=2)
    expected = _reference(tiny_checkpoint(family), family, [(a, 1.0), (b, 0.7)])
    for engine in (merged, dynamic):
        engine.load_lora(a)
        engine.load_lora(b, scale=0.7)
    try:
        ours_merged = _latents(merged, family)
        ours_dynamic = _latents(dynamic, family)
        torch.testing.assert_close(ours_merged, expected.reshape(ours_merged.shape), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_dynamic, ours_merged, atol=1e-5, rtol=0)  # float32 rounding only
        assert [lora["name"] for lora in merged.loras] == ["a", "b"]
        merged.set_lora_scales({"b": 0.0})
        only_a = _latents(merged, family)
        torch.testing.assert_close(only_a, _latents(dynamic, family, loras={"a": 1.0}), atol=1e-5, rtol=0)
    finally:
        merged.unload_lora()
        dynamic.unload_lora()


def test_dynamic_requests_never_mix_loras(engines, tmp_path):
    family = "wan-t2v"
    engine = engines(family, "dynamic")
    plain = _latents(engine, family)
    a = write_lora(tmp_path / "a.safetensors", engine, "wan-original", seed=3)
    b = write_lora(tmp_path / "b.safetensors", engine, "wan-original", seed=4)
    engine.load_lora(a)
    engine.load_lora(b)
    try:
        with_a = _latents(engine, family, loras={"a": 1.0})
        with_b = _latents(engine, family, loras={"b": 0.5})
        again_a = _latents(engine, family, loras={"a": 1.0})
        neither = _latents(engine, family, loras={})
        assert torch.equal(with_a, again_a)
        assert torch.equal(neither, plain)
        assert not torch.allclose(with_a, with_b)
        # the dynamic 'a' alone equals 'a' merged alone (another engine), within float32 rounding
        merged = engines(family)
        merged.load_lora(a)
        try:
            torch.testing.assert_close(with_a, _latents(merged, family), atol=1e-5, rtol=0)
        finally:
            merged.unload_lora()
    finally:
        engine.unload_lora()
    assert not any(type(m).__name__ == "LoRALinear" for m in engine.pipeline.transformer.modules())


def test_bad_files_are_refused_and_change_nothing(engines, tmp_path):
    engine = engines("flux")
    before = _weights(engine)
    not_safetensors = tmp_path / "x.safetensors"
    not_safetensors.write_bytes(b"this is not a safetensors file")
    with pytest.raises(InvalidRequestError, match="is not a safetensors file"):
        engine.load_lora(str(not_safetensors))
    wrong_keys = tmp_path / "keys.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.no_such.lora_A.weight": torch.zeros(4, 8),
               "transformer.transformer_blocks.0.attn.no_such.lora_B.weight": torch.zeros(8, 4)}, str(wrong_keys))
    with pytest.raises(InvalidRequestError, match="transformer_blocks.0.attn.no_such: no such layer"):
        engine.load_lora(str(wrong_keys))
    good = write_lora(tmp_path / "good.safetensors", engine, "flux-peft")
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(good)
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    tensors[key] = torch.zeros(RANK, tensors[key].shape[1] + 1)
    wrong_shape = tmp_path / "shape.safetensors"
    save_file(tensors, str(wrong_shape))
    with pytest.raises(InvalidRequestError, match=r"transformer_blocks.0.attn.to_q: A \(4, \d+\) and B"):
        engine.load_lora(str(wrong_shape))
    text_encoder = tmp_path / "te.safetensors"
    save_file({"text_encoder.foo.lora_A.weight": torch.zeros(4, 8)}, str(text_encoder))
    with pytest.raises(InvalidRequestError, match="cannot apply"):
        engine.load_lora(str(text_encoder))
    after = _weights(engine)
    assert engine.loras == [] and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(InvalidRequestError, match="needs --lora-mode dynamic"):
        engine.load_lora(good, name="g")
        try:
            engine.generate(PROMPT, loras={"g": 1.0})
        finally:
            engine.unload_lora()
    with pytest.raises(InvalidRequestError, match="no LoRA is loaded"):
        engine.unload_lora("g")


def test_lora_spec_parsing():
    assert parse_lora_spec("a.safetensors") == ("a.safetensors", 1.0, "transformer")
    assert parse_lora_spec("dir/b.safetensors:0.7") == ("dir/b.safetensors", 0.7, "transformer")
    assert parse_lora_spec("C:/x/c.safetensors") == ("C:/x/c.safetensors", 1.0, "transformer")
    assert parse_lora_spec("low.safetensors:0.7@transformer_2") == ("low.safetensors", 0.7, "transformer_2")
    assert parse_lora_spec("low.safetensors@transformer_2") == ("low.safetensors", 1.0, "transformer_2")
    assert parse_lora_spec("v1@2/a.safetensors:0.5") == ("v1@2/a.safetensors", 0.5, "transformer")  # not a suffix
    with pytest.raises(InvalidRequestError, match="'vae' is not a DiT to put a LoRA on; choose one of transformer, "
                       "transformer_2"):
        parse_lora_spec("a.safetensors@vae")


@pytest.mark.parametrize("mode", ["merged", "dynamic"])
def test_lora_over_layerwise_offload(engines, tiny_checkpoint, tmp_path, mode):
    """Merging goes into the stored copies (no streamed-in block keeps stale weights); adapters live on the
    compute device; unloading restores the plain output."""
    family = "flux"
    plain_engine = engines(family, mode)
    offloaded = Engine.from_pretrained(tiny_checkpoint(family), device="cpu", dtype="float32", offload="layerwise",
                                       lora_mode=mode)
    plain = _latents(offloaded, family)  # leaves the first block(s) prefetched
    file = write_lora(tmp_path / "a.safetensors", plain_engine, "flux-peft", seed=7)
    offloaded.load_lora(file)
    plain_engine.load_lora(file)
    try:
        torch.testing.assert_close(_latents(offloaded, family), _latents(plain_engine, family), atol=1e-6, rtol=0)
    finally:
        plain_engine.unload_lora()
    offloaded.unload_lora()
    assert torch.equal(_latents(offloaded, family), plain)


def test_wan22_second_expert_takes_its_own_lora_through_the_cli(tiny_checkpoint, tmp_path, capsys):
    """``--lora-path low.safetensors:0.7@transformer_2``: the low-noise expert's LoRA, as diffusers loads it with
    ``load_lora_weights(..., load_into_transformer_2=True)``; the high-noise expert gets the plain one."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights (the reference) needs peft")
    import diffusers
    from PIL import Image

    from diffgen.entrypoints.cli import main

    path = tiny_checkpoint("wan22-a14b")
    sampling = dict(height=32, width=48, num_frames=5, num_inference_steps=8, max_sequence_length=16,
                    negative_prompt="bad", guidance_scale=5.0, guidance_scale_2=2.0)
    plain = Engine.from_pretrained(path, device="cpu", dtype="float32")
    high = write_lora(tmp_path / "high.safetensors", plain, "wan-original", seed=21)
    low = write_lora(tmp_path / "low.safetensors", plain, "wan-original", seed=22)
    specs = [high, f"{low}:0.7@transformer_2"]
    engine = Engine.from_pretrained(path, device="cpu", dtype="float32", lora_path=specs)
    assert [(r["name"], r["scale"], r["component"]) for r in engine.loras] == [
        ("high", 1.0, "transformer"), ("low", 0.7, "transformer_2")]
    ours = engine.generate(PROMPT, seed=5, return_tensors=True, **sampling)

    pipe = diffusers.WanPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for model in (pipe.transformer, pipe.transformer_2):
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()  # aligned like ours: see tests/test_wan.py
    pipe.load_lora_weights(high, adapter_name="high")
    pipe.load_lora_weights(low, adapter_name="low", load_into_transformer_2=True)
    pipe.transformer_2.set_adapters(["low"], [0.7])
    expected = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(5), output_type="latent", **sampling).frames
    torch.testing.assert_close(ours.latents, expected, atol=1e-5, rtol=0)
    both_high = Engine.from_pretrained(path, device="cpu", dtype="float32", lora_path=[high, f"{low}:0.7"])
    assert (both_high.generate(PROMPT, seed=5, return_tensors=True, **sampling).latents - ours.latents).abs().max() \
        > 1e-3  # where the LoRA goes matters well beyond the tolerance

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sampling.items()]
    code = main(["generate", "--model-path", path, "--device", "cpu", "--dtype", "float32", "--prompt", PROMPT,
                 "--seed", "5", *flags, "--lora-path", specs[0], "--lora-path", specs[1], "--save-output",
                 "--output-format", "png-frames", "--output-path", str(tmp_path), "--output-file-name", "clip"])
    assert code == 0, capsys.readouterr().err
    frames = sorted((tmp_path / "clip").iterdir())
    assert [np.asarray(Image.open(f).convert("RGB")).tolist() for f in frames] == [f.tolist() for f in ours.frames[0]]


def test_dynamic_lora_is_not_compiled(tiny_checkpoint, capsys):
    """Dynamic adapters are read per request inside each linear, which the compiler cannot trace: an explicit
    --compile is one error before loading; the default (compile on for a CUDA server) runs them eager."""
    from diffgen.engine.optimize import resolve_compile
    from diffgen.entrypoints.cli import main
    from diffgen.errors import DiffgenError

    message = "--compile cannot be used with --lora-mode dynamic"
    with pytest.raises(DiffgenError, match=message):
        Engine.from_pretrained(tiny_checkpoint("flux"), device="cpu", compile=True, lora_mode="dynamic")
    with pytest.raises(DiffgenError, match=message):
        Engine.with_workers(tiny_checkpoint("flux"), device="cpu", compile=True, lora_mode="dynamic")
    code = main(["generate", "--model-path", tiny_checkpoint("flux"), "--device", "cpu", "--prompt", PROMPT,
                 "--compile", "--lora-mode", "dynamic"])
    assert code != 0 and message in capsys.readouterr().err
    cuda = torch.device("cuda")
    assert resolve_compile(None, cuda, serving=True, lora_mode="merged")
    assert not resolve_compile(None, cuda, serving=True, lora_mode="dynamic")
