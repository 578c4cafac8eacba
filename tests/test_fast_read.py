"""The parallel safetensors reader returns exactly what safetensors' own reader returns."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffgen.loader import fast_read


def test_parallel_reader_equals_safe_open(tmp_path, monkeypatch):
    monkeypatch.setattr(fast_read, "CHUNK_BYTES", 1000)  # many chunks per tensor, and partial last chunks
    torch.manual_seed(0)
    shards = [
        {"a.weight": torch.randn(33, 70), "a.bias": torch.randn(70).bfloat16(), "ids": torch.arange(17),
         "empty": torch.zeros(0, 4)},
        {"b.weight": torch.randn(5, 1001).half(), "mask": torch.rand(9) > 0.5, "scalar": torch.tensor(2.5),
         "f8": torch.randn(40, 16).to(torch.float8_e4m3fn)},
    ]
    files = []
    for i, tensors in enumerate(shards):
        files.append(tmp_path / f"shard{i}.safetensors")
        save_file(tensors, files[-1], metadata={"format": "pt"})
    got = fast_read.load_files(files, "cpu", keep=lambda name: name != "ids")
    expected = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            expected.update({key: f.get_tensor(key) for key in f.keys() if key != "ids"})
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape
        assert torch.equal(got[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key


def test_convert_runs_per_tensor(tmp_path):
    save_file({"w": torch.randn(4, 4), "n": torch.arange(3)}, tmp_path / "x.safetensors")
    got = fast_read.load_files([tmp_path / "x.safetensors"], "cpu",
                               convert=lambda name, t: t.bfloat16() if t.is_floating_point() else t)
    assert got["w"].dtype == torch.bfloat16 and got["n"].dtype == torch.int64
