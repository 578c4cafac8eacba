"""diffgen's own T5 / UMT5 encoders and CLIP text model against transformers' models on the same weights:
equal outputs (float32, and bfloat16 / float16 as transformers loads them), strict loading from the names
transformers writes (and the older names it maps), and transformers' class for a config they do not build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from diffgen.errors import ModelLoadError
from diffgen.loader.components import load_pipeline
from diffgen.loader.weights import load_native_model
from diffgen.models.encoders.clip import CLIPTextModel
from diffgen.models.encoders.t5 import T5Encoder, UMT5Encoder
from diffgen.testing.randomize import randomize_constant_parameters

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids_and_mask(vocab: int, end_of_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 13 tokens, each with an end-of-text token (once twice), the first padded after 9."""
    ids = torch.randint(2, vocab - 1, (2, 13), generator=torch.Generator().manual_seed(0))
    ids[0, 8], ids[1, 5], ids[1, 11] = end_of_text, end_of_text, end_of_text
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    return ids, mask


def _assert_equal_to_transformers(native_cls, library_cls, folder: Path, dtype: torch.dtype, vocab: int,
                                  end_of_text: int) -> None:
    ours = load_native_model(native_cls, folder, dtype, "cpu")
    reference = library_cls.from_pretrained(folder, dtype=dtype).eval()
    theirs = dict(reference.named_parameters())
    for name, parameter in ours.named_parameters():  # the dtypes transformers gives each tensor (wo: float16 rule)
        assert parameter.dtype == theirs[name].dtype, name
    assert ours.dtype == reference.dtype
    ids, mask = _ids_and_mask(vocab, end_of_text)
    for attention_mask in (None, mask):
        with torch.no_grad():
            expected, got = reference(ids, attention_mask=attention_mask), ours(ids, attention_mask)
        assert got.last_hidden_state.dtype == expected.last_hidden_state.dtype
        assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
        if isinstance(ours, CLIPTextModel):
            assert torch.equal(got.pooler_output, expected.pooler_output)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_t5_encoder_equals_transformers(tiny_flux, dtype):
    _assert_equal_to_transformers(T5Encoder, transformers.T5EncoderModel, Path(tiny_flux) / "text_encoder_2", dtype,
                                  vocab=256, end_of_text=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_umt5_encoder_equals_transformers(tiny_checkpoint, dtype):
    _assert_equal_to_transformers(UMT5Encoder, transformers.UMT5EncoderModel,
                                  Path(tiny_checkpoint("wan-t2v")) / "text_encoder", dtype, vocab=256, end_of_text=1)


def test_float16_keeps_t5_wo_in_float32_and_bfloat16_does_not(tiny_flux):
    folder = Path(tiny_flux) / "text_encoder_2"
    wo = lambda model: model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype  # noqa: E731
    assert wo(load_native_model(T5Encoder, folder, torch.float16, "cpu")) == torch.float32
    assert wo(load_native_model(T5Encoder, folder, torch.bfloat16, "cpu")) == torch.bfloat16


def _clip_checkpoint(path: Path, hidden_act: str, eos_token_id: int) -> Path:
    """A tiny CLIPTextModel saved by transformers; end-of-text is the vocabulary's last id, as in CLIP's tokenizer."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=20, hidden_act=hidden_act,
                                         bos_token_id=98, eos_token_id=eos_token_id, pad_token_id=99)
    randomize_constant_parameters(transformers.CLIPTextModel(config)).save_pretrained(path)
    return path


# FLUX's CLIP-L: quick GELU and eos_token_id 2 (a config from before transformers' fix: the highest id is taken);
# the tiny FLUX checkpoint: GELU and the first position of its eos_token_id.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden_act, eos_token_id", [("quick_gelu", 2), ("gelu", 99)])
def test_clip_text_model_equals_transformers(tmp_path, dtype, hidden_act, eos_token_id):
    folder = _clip_checkpoint(tmp_path / "clip", hidden_act, eos_token_id)
    _assert_equal_to_transformers(CLIPTextModel, transformers.CLIPTextModel, folder, dtype, vocab=100,
                                  end_of_text=99)


def test_clip_text_model_of_the_tiny_flux_checkpoint_equals_transformers(tiny_flux):
    _assert_equal_to_transformers(CLIPTextModel, transformers.CLIPTextModel, Path(tiny_flux) / "text_encoder",
                                  torch.float32, vocab=1000, end_of_text=1)


def _rewrite_weights(folder: Path, change) -> None:
    file = folder / "model.safetensors"
    save_file(change(load_file(file)), file)


def test_hub_layouts_load_as_transformers_maps_them(tiny_flux, tmp_path):
    """The hub's files (written by transformers 4) name CLIP's tensors under ``text_model.`` with the old
    position_ids buffer, and may hold T5's tied embedding under ``encoder.embed_tokens`` instead of, or beside,
    ``shared``: every layout gives the same model as the library's."""
    clip = tmp_path / "clip"
    shutil.copytree(Path(tiny_flux) / "text_encoder", clip)
    _rewrite_weights(clip, lambda state: {**{f"text_model.{k}": v for k, v in state.items()},
                                          "text_model.embeddings.position_ids": torch.arange(77)[None]})
    _assert_equal_to_transformers(CLIPTextModel, transformers.CLIPTextModel, clip, torch.float32, vocab=1000,
                                  end_of_text=1)
    layouts = {
        "alias_only": lambda state: {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
                                     for k, v in state.items()},
        "both": lambda state: {**state, "encoder.embed_tokens.weight": state["shared.weight"].clone()},
    }
    for name, change in layouts.items():
        t5 = tmp_path / name
        shutil.copytree(Path(tiny_flux) / "text_encoder_2", t5)
        _rewrite_weights(t5, change)
        _assert_equal_to_transformers(T5Encoder, transformers.T5EncoderModel, t5, torch.float32, vocab=256,
                                      end_of_text=1)


def test_loading_is_strict_and_lists_the_keys(tiny_flux, tmp_path):
    t5 = tmp_path / "t5"
    shutil.copytree(Path(tiny_flux) / "text_encoder_2", t5)
    missing = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    _rewrite_weights(t5, lambda state: {**{k: v for k, v in state.items() if k != missing},
                                        "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight":
                                            torch.zeros(8, 4)})
    with pytest.raises(ModelLoadError) as error:
        load_native_model(T5Encoder, t5, torch.float32, "cpu")
    message = str(error.value)
    assert f"missing keys [{missing}]" in message
    assert "unexpected keys [encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight]" in message


def test_configs_not_built_natively_go_to_transformers(tiny_flux, tmp_path):
    """A T5 with the original ReLU feed-forward and a CLIP with another activation: the pipeline loads
    transformers' classes for them (decided from config.json), and still runs."""
    folder = tmp_path / "flux"
    shutil.copytree(tiny_flux, folder)
    torch.manual_seed(0)
    relu_t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        feed_forward_proj="relu", decoder_start_token_id=0))
    shutil.rmtree(folder / "text_encoder_2")
    relu_t5.save_pretrained(folder / "text_encoder_2")
    config_file = folder / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "hidden_act": "gelu_new"}))
    assert T5Encoder.unsupported({"feed_forward_proj": "relu"})
    assert CLIPTextModel.unsupported({"hidden_act": "gelu_new"})

    pipeline = load_pipeline(str(folder), device="cpu", dtype=torch.float32)
    assert type(pipeline.text_encoder_2) is transformers.T5EncoderModel
    assert type(pipeline.text_encoder) is transformers.CLIPTextModel
    assert pipeline.text_encoder.config.hidden_act == "gelu_new"
    native = load_pipeline(tiny_flux, device="cpu", dtype=torch.float32)
    assert type(native.text_encoder_2) is T5Encoder and type(native.text_encoder) is CLIPTextModel
    # the pipeline's text stage runs on the library's models: the embeddings are theirs
    embeds = pipeline._encode(["a fox"], max_length=16, repeat=1)
    t5_ids = pipeline.tokenizer_2(["a fox"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = relu_t5.eval()(t5_ids).last_hidden_state
    assert torch.equal(embeds["encoder_hidden_states"], expected)


def test_pipeline_builds_the_encoders_around_the_tensors_diffgen_read(tiny_flux, monkeypatch):
    """FLUX's text encoders are read by diffgen's reader in the loader's background thread and assigned without a
    copy, as its DiT (no transformers model code involved)."""
    import diffgen.loader.components as components

    pointers, original = set(), components.read_native_checkpoint

    def remembering_read(*args):
        state = original(*args)
        pointers.update(tensor.data_ptr() for tensor in state.values())
        return state

    monkeypatch.setattr(components, "read_native_checkpoint", remembering_read)
    pipeline = load_pipeline(tiny_flux, device="cpu", dtype=torch.bfloat16)
    for name in ("text_encoder", "text_encoder_2"):
        model = pipeline.components[name]
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        for key, parameter in model.named_parameters():
            assert parameter.data_ptr() in pointers, f"{name}: {key} was copied"


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def real_width_encoders(folder: Path, which: str, t5_blocks: int = 2):
    """transformers' model at the real widths with random weights (T5-XXL: ``t5_blocks`` of its 24 blocks; CLIP-L:
    all 12), saved in bfloat16 as the hub's files are; (library class, native class, vocabulary, end-of-text id)."""
    torch.manual_seed(0)
    if which == "t5-xxl":
        config = transformers.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_blocks,
                                       num_heads=64, feed_forward_proj="gated-gelu", decoder_start_token_id=0)
        library_cls, native_cls, vocab, end = transformers.T5EncoderModel, T5Encoder, 32128, 1
    else:
        config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                             num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
                                             eos_token_id=2, bos_token_id=0, pad_token_id=1, projection_dim=768)
        library_cls, native_cls, vocab, end = transformers.CLIPTextModel, CLIPTextModel, 49408, 49407
    randomize_constant_parameters(library_cls(config)).to(torch.bfloat16).save_pretrained(folder)
    return library_cls, native_cls, vocab, end


def compare_bf16_with_float32(folder: Path, which: str, tokens: int, device: str, t5_blocks: int = 2) -> dict:
    """{output field: (transformers' bf16 error, diffgen's bf16 error, diffgen vs transformers)}, errors relative
    to transformers' float32 forward on the same (bf16) weights."""
    library_cls, native_cls, vocab, end = real_width_encoders(folder, which, t5_blocks)
    ids = torch.randint(2, vocab - 1, (2, tokens), generator=torch.Generator().manual_seed(0))
    ids[:, tokens // 2] = end
    ids = ids.to(device)
    with torch.no_grad():
        exact = library_cls.from_pretrained(folder, dtype=torch.float32).to(device).eval()(ids)
        theirs = library_cls.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()(ids)
        ours = load_native_model(native_cls, folder, torch.bfloat16, device)(ids)
    errors = {}
    for field in ("last_hidden_state", "pooler_output") if which == "clip-l" else ("last_hidden_state",):
        exact_out, their_out, our_out = (getattr(out, field) for out in (exact, theirs, ours))
        assert our_out.dtype == their_out.dtype == torch.bfloat16
        errors[field] = (_relative_error(their_out, exact_out), _relative_error(our_out, exact_out),
                         _relative_error(our_out, their_out))
        print(f"{which} {field} ({tokens} tokens, {device}): bf16 vs float32: transformers {errors[field][0]:.2e}, "
              f"diffgen {errors[field][1]:.2e}; diffgen vs transformers {errors[field][2]:.2e}")
    return errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bf16 kernels at the real widths")
@pytest.mark.parametrize("which, tokens", [("t5-xxl", 512), ("clip-l", 77)])
def test_real_width_bf16_encoders_agree_with_transformers_on_the_gpu(tmp_path, which, tokens):
    """In bfloat16 on the GPU the kernels may differ (diffgen's RMS norm is one fused kernel; attention is SDPA's
    own choice in both): both bf16 outputs are compared with transformers' float32 forward on the same (bf16)
    weights; diffgen's error must be within 1.5x transformers' own bf16 error, and the two outputs within 2x of it."""
    for their_error, our_error, between in compare_bf16_with_float32(tmp_path / which, which, tokens, "cuda").values():
        assert their_error < 5e-2  # a bf16 rounding error (CPU: 6.7e-3 T5, 1.5e-2 CLIP), not a broken reference
        assert our_error <= 1.5 * their_error
        assert between <= 2 * their_error
