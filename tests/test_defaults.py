"""The default speed settings: when blocks are compiled, where the compile cache lives, the serve warm-up."""

from __future__ import annotations

import torch

from diffgen.engine.optimize import resolve_compile, use_persistent_compile_cache
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
