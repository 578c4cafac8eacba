"""The default speed settings: when blocks are compiled, where the compile cache lives, the serve warm-up."""

from __future__ import annotations

import torch

from diffgen.engine.optimize import (
    INDUCTOR_DEFAULTS,
    apply_compile,
    inductor_options,
    resolve_compile,
    use_persistent_compile_cache,
)
from diffgen.entrypoints.cli import build_parser

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_compile_by_default_only_for_a_server_on_cuda():
    assert resolve_compile(None, CUDA, serving=True)
    assert not resolve_compile(None, CUDA, serving=False)  # one-shot generate: eager is faster end to end
    assert not resolve_compile(None, CPU, serving=True)
    assert resolve_compile(True, CPU, serving=False) and not resolve_compile(False, CUDA, serving=True)


def test_compile_flags_parse_to_three_states():
    parser = build_parser()
    base = ["generate", "--model-path", "x", "--prompt", "p"]
    assert parser.parse_args(base).compile is None
    assert parser.parse_args([*base, "--compile"]).compile is True
    assert parser.parse_args([*base, "--no-compile"]).compile is False


def test_compiled_blocks_round_like_eager(monkeypatch, tmp_path):
    """Served DiT blocks are compiled with Inductor rounding where eager rounds (bf16 agreement with diffusers:
    the compiled Qwen-Image forward was past the 2e-2 bound without it); the DiT's blocks only."""
    monkeypatch.setenv("DIFFGEN_CACHE_DIR", str(tmp_path))
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((self, kw)))
    blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    dit = torch.nn.Module()
    dit.blocks, dit.proj_out = blocks, torch.nn.Linear(2, 2)
    assert apply_compile({"transformer": dit, "vae": torch.nn.Linear(2, 2)}) == 2
    assert [module for module, _ in seen] == list(blocks)
    assert all(kw["options"]["emulate_precision_casts"] is True for _, kw in seen)


def test_a_dit_declares_its_own_inductor_options_over_the_defaults(monkeypatch, tmp_path):
    """A DiT class's ``inductor_options`` (a setting measured per model) override INDUCTOR_DEFAULTS for its blocks
    only, and an explicit option (the bench's) overrides both."""
    monkeypatch.setenv("DIFFGEN_CACHE_DIR", str(tmp_path))
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw["options"]))

    class Declaring(torch.nn.Module):
        inductor_options = {"emulate_precision_casts": False, "coordinate_descent_tuning": True}

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    plain = torch.nn.Module()
    plain.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    assert apply_compile({"transformer": Declaring(), "transformer_2": plain}) == 2
    assert seen == [{**INDUCTOR_DEFAULTS, "emulate_precision_casts": False, "coordinate_descent_tuning": True},
                    INDUCTOR_DEFAULTS]
    assert inductor_options(Declaring(), {"emulate_precision_casts": True}) == {
        **INDUCTOR_DEFAULTS, "emulate_precision_casts": True, "coordinate_descent_tuning": True}


def test_compile_cache_lives_in_the_diffgen_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("DIFFGEN_CACHE_DIR", str(tmp_path))
    assert use_persistent_compile_cache() == tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice wins
    assert use_persistent_compile_cache() == tmp_path / "mine"


def test_warm_up_runs_a_short_request_also_for_edit_models(tiny_checkpoint):
    from diffgen import Engine

    for family in ("flux", "qwen-image-edit"):
        engine = Engine.from_pretrained(tiny_checkpoint(family), device="cpu")
        calls = []
        original = engine.run
        engine.run = lambda request, calls=calls, original=original, **kw: calls.append(request) or original(
            request, **kw)
        engine.warm_up(sizes=[(32, 48)])
        assert [(r.height, r.width, r.num_inference_steps) for r in calls] == [(32, 48, 2)]


def test_warmup_sizes_parse_as_the_http_size_field():
    import pytest

    from diffgen.engine.loading import parse_warmup_sizes
    from diffgen.errors import DiffgenError

    assert parse_warmup_sizes("1024x1024, 1344x768") == [(1024, 1024), (768, 1344)]  # WIDTHxHEIGHT -> (h, w)
    assert parse_warmup_sizes(None) is None and parse_warmup_sizes([(64, 32)]) == [(64, 32)]
    with pytest.raises(DiffgenError, match=r"--warmup-sizes: '1024' is not of the form WIDTHxHEIGHT"):
        parse_warmup_sizes("1024x1024,1024")
    with pytest.raises(DiffgenError, match=r"'8x64': each side must be between 16 and 4096"):
        parse_warmup_sizes("8x64")
    args = build_parser().parse_args(["serve", "--model-path", "x", "--warmup-sizes", "512x512,768x512"])
    assert args.warmup_sizes == "512x512,768x512"


def test_serving_engine_warms_up_at_the_configured_sizes(tiny_checkpoint, monkeypatch):
    """A compiled serving engine (compile forced on CPU here) runs one warm-up request per size before returning."""
    import pytest

    from diffgen import Engine
    from diffgen.engine import loading
    from diffgen.errors import DiffgenError

    seen = []
    monkeypatch.setattr(loading, "warm_up", lambda pipeline, sizes=None, run=None: seen.append(sizes))
    monkeypatch.setattr(loading, "logger", type("L", (), {"warning": lambda *a: seen.append("warned")}))
    monkeypatch.setattr("diffgen.engine.optimize.apply_compile", lambda components: 0)  # no Inductor on CPU tests
    Engine.from_pretrained(tiny_checkpoint("flux"), device="cpu", compile=True, serving=True,
                           warmup_sizes="48x32,64x64")
    assert seen == [[(32, 48), (64, 64)]]
    Engine.from_pretrained(tiny_checkpoint("flux"), device="cpu", serving=True, warmup_sizes="48x32")
    assert seen[-1] == "warned"  # not compiled: nothing to warm up, and the user is told
    with pytest.raises(DiffgenError, match="--warmup-sizes"):
        Engine.with_workers(tiny_checkpoint("flux"), device="cpu", warmup_sizes="48by32")
