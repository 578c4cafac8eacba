"""diffgen's CLIP and T5 tokenizers (no transformers import) give the ids and masks of transformers' own tokenizers,
loaded from the same folder: the tiny checkpoints' tokenizers, the hub's FLUX layout (CLIP from vocab.json +
merges.txt, the hub's tokenizer_config.json files), a CLIP vocabulary of the real size (49408 tokens, BPE trained
here on torch's Python sources and made-up words: the real CLIP vocabulary is not available offline) and a T5
SentencePiece model with its nmt_nfkc normalisation (8000 pieces + 100 sentinels, trained here). The loader builds
them for FLUX and falls back to transformers' classes for what they do not cover or with the switch at 0."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from diffgen.errors import ModelLoadError
from diffgen.loader.components import load_pipeline, native_class
from diffgen.models.encoders.common import NATIVE_TOKENIZERS_ENV
from diffgen.models.encoders.tokenizers import CLIPTokenizer, T5Tokenizer
from diffgen.pipelines.flux import FluxPipeline
from diffgen.testing.tokenizers import (
    FLUX_T5_CONFIG,
    clip_hub_folder,
    real_size_clip_folder,
    real_size_t5_folder,
    torch_sources,
)

PROMPTS = [
    "", "a photo of a raccoon", "A Photo Of A Raccoon", "  extra   whitespace\tand\nnew lines  ",
    "\u00a0no-break space", "Café naïve façade résumé Ångström Øresund ß ﬁ", "“curly quotes” — em dash … ½ ① ²",
    "emoji 🦝🔥👍🏽 👨‍👩‍👧 and ZWJ",
    "中文 日本語 한국어 русский ελληνικά العربية", "numbers 1234567 3.14 -42 1e9 0x1F 2026-11-27",
    "Punctuation!!! ??? ... ;:,-_()[]{}<>@#$%^&*+=|\\/~`'\"", "MiXeD CaSe WORDS and camelCaseWords",
    "it's we're they've I'm you'll he'd DON'T", "<|endoftext|> and <|startoftext|> inside, <|ENDOFTEXT|>",
    "</s> <pad> <unk> <extra_id_5> <extra_id_0>", "tabs\t\tand\r\ncarriage returns", "a" * 300,
    " ".join(f"word{i}" for i in range(120)), " ".join(["a long prompt with many ordinary words"] * 120),
]


def assert_same_as_transformers(folder: Path, native_cls: type, lengths: tuple[int, ...]) -> None:
    """Every prompt, alone and as one batch, padded (and truncated) to each length: equal ids and masks."""
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    native = native_cls.from_folder(folder)
    assert native.model_max_length == reference.model_max_length
    for length in lengths:
        for texts in [PROMPTS, *([p] for p in PROMPTS)]:
            expected = reference(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            got = native(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            assert got.input_ids.dtype == expected.input_ids.dtype
            for row, text in enumerate(texts):
                assert torch.equal(got.input_ids[row], expected.input_ids[row]), (length, text[:80])
                assert torch.equal(got.attention_mask[row], expected.attention_mask[row]), (length, text[:80])
    # the prompts do reach both ends: some are cut at the length, some are mostly padding
    ids = native(PROMPTS, max_length=lengths[0], truncation=True).attention_mask
    assert ids.all(dim=1).any() and not ids[:, -1].all()


def test_tiny_flux_tokenizers_equal_transformers(tiny_flux):
    assert_same_as_transformers(Path(tiny_flux) / "tokenizer", CLIPTokenizer, (77, 8))
    assert_same_as_transformers(Path(tiny_flux) / "tokenizer_2", T5Tokenizer, (512, 256, 16))


def test_clip_from_vocab_and_merges_as_the_hub_stores_it(tiny_flux, tmp_path):
    """The tiny vocabulary, re-laid out as FLUX.1-dev's folder (its specials at the end as in the real one)."""
    model = json.loads((Path(tiny_flux) / "tokenizer" / "tokenizer.json").read_text())["model"]
    words = [t for t in sorted(model["vocab"], key=model["vocab"].get) if not t.startswith("<|")]
    vocab = {t: i for i, t in enumerate([*words, "<|startoftext|>", "<|endoftext|>"])}
    folder = clip_hub_folder(tmp_path / "tokenizer", vocab, model["merges"])
    assert CLIPTokenizer.unsupported_folder(folder) is None
    assert_same_as_transformers(folder, CLIPTokenizer, (77, 5))


@pytest.fixture(scope="module")
def real_size_clip(tmp_path_factory) -> Path:
    return real_size_clip_folder(tmp_path_factory.mktemp("clip") / "tokenizer")


def test_real_size_clip_vocabulary_equals_transformers(real_size_clip):
    assert len(json.loads((real_size_clip / "vocab.json").read_text())) == 49408
    assert_same_as_transformers(real_size_clip, CLIPTokenizer, (77, 12))


def test_real_size_t5_tokenizer_json_equals_transformers(tmp_path):
    """T5's size (32100 pieces with the sentinels), made-up pieces: the layout the one-shot bench writes."""
    folder = real_size_t5_folder(tmp_path / "tokenizer_2")
    assert len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) == 32100
    assert_same_as_transformers(folder, T5Tokenizer, (512, 9))


@pytest.fixture(scope="module")
def sentencepiece_t5(tmp_path_factory) -> Path:
    """A T5 SentencePiece Unigram (nmt_nfkc normalisation, <pad>=0 </s>=1 <unk>=2, 100 sentinels) converted by
    transformers into the tokenizer.json that FLUX.1-dev's tokenizer_2 ships, with that folder's config."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece trains the T5 model and converts it")
    lines = [line for text in torch_sources(8) for line in text.splitlines() if line.strip()][:100_000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=8000,
                                   model_type="unigram", normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, minloglevel=2, num_threads=2)
    source = tmp_path_factory.mktemp("spm")
    (source / "spiece.model").write_bytes(model.getvalue())
    folder = tmp_path_factory.mktemp("t5") / "tokenizer_2"
    transformers.T5Tokenizer.from_pretrained(source, extra_ids=100).save_pretrained(folder)  # converts spiece.model
    spec = json.loads((folder / "tokenizer.json").read_text())
    assert "Precompiled" in json.dumps(spec["normalizer"])  # the SentencePiece normalisation map travels in it
    (folder / "tokenizer_config.json").write_text(json.dumps(FLUX_T5_CONFIG))
    return folder


def test_sentencepiece_t5_with_its_normalisation_equals_transformers(sentencepiece_t5):
    assert T5Tokenizer.unsupported_folder(sentencepiece_t5) is None
    assert_same_as_transformers(sentencepiece_t5, T5Tokenizer, (512, 77, 9))


def test_flux_loads_the_native_tokenizers_and_the_switch_brings_transformers_back(tiny_flux, monkeypatch):
    native = load_pipeline(tiny_flux, device="cpu", dtype=torch.float32)
    assert type(native.tokenizer) is CLIPTokenizer and type(native.tokenizer_2) is T5Tokenizer
    monkeypatch.setenv(NATIVE_TOKENIZERS_ENV, "0")
    library = load_pipeline(tiny_flux, device="cpu", dtype=torch.float32)
    assert isinstance(library.tokenizer, transformers.CLIPTokenizer)
    assert isinstance(library.tokenizer_2, transformers.T5Tokenizer)
    # the same text embeddings through either
    for pipeline in (native, library):
        pipeline.text_encoder, pipeline.text_encoder_2 = native.text_encoder, native.text_encoder_2
    with torch.no_grad():
        a, b = (p._encode(PROMPTS[:6], max_length=32, repeat=1) for p in (native, library))
    assert all(torch.equal(a[key], b[key]) for key in a)


def _edited_copy(folder: Path, tmp_path: Path, **config) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    path = copy / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return copy


@pytest.mark.parametrize("change, why", [
    ({"tokenizer_class": "BertTokenizer"}, "tokenizer_class 'BertTokenizer'"),
    ({"padding_side": "left"}, "padding_side 'left'"),
    ({"truncation_side": "left"}, "truncation_side 'left'"),
    ({"model_max_length": 10**30}, "model_max_length"),
])
def test_a_config_the_native_tokenizers_do_not_build_goes_to_transformers(tiny_flux, tmp_path, change, why):
    for name, native_cls in (("tokenizer", CLIPTokenizer), ("tokenizer_2", T5Tokenizer)):
        folder = _edited_copy(Path(tiny_flux) / name, tmp_path / name, **change)
        assert why in native_cls.unsupported_folder(folder)
        assert native_class(FluxPipeline, folder, native_cls.tokenizer_classes[0]) is None


def test_missing_files_go_to_transformers(tiny_flux, tmp_path):
    clip = _edited_copy(Path(tiny_flux) / "tokenizer", tmp_path / "clip")
    (clip / "tokenizer.json").unlink()
    assert CLIPTokenizer.unsupported_folder(clip) == "neither tokenizer.json nor vocab.json + merges.txt"
    t5 = _edited_copy(Path(tiny_flux) / "tokenizer_2", tmp_path / "t5")
    (t5 / "tokenizer.json").unlink()
    assert T5Tokenizer.unsupported_folder(t5) == "no tokenizer.json (a spiece.model alone)"
    (clip / "tokenizer_config.json").unlink()
    assert CLIPTokenizer.unsupported_folder(clip) == "no tokenizer_config.json"


def test_a_tokenizer_json_of_another_model_is_a_load_error(tiny_flux, tmp_path):
    """Checked while building (the loader's decision does not parse tokenizer.json: it runs before the reads)."""
    t5 = _edited_copy(Path(tiny_flux) / "tokenizer_2", tmp_path / "t5")
    shutil.copy(Path(tiny_flux) / "tokenizer" / "tokenizer.json", t5 / "tokenizer.json")
    with pytest.raises(ModelLoadError, match="a Unigram model expected for this tokenizer class, found 'BPE'"):
        T5Tokenizer.from_folder(t5)


def test_other_call_arguments_are_refused(tiny_flux):
    tokenizer = T5Tokenizer.from_folder(Path(tiny_flux) / "tokenizer_2")
    with pytest.raises(ValueError, match="pads to max_length"):
        tokenizer(["a fox"], padding="longest")
    ids = tokenizer("a fox", max_length=8).input_ids  # one text, transformers' default: no truncation
    assert ids.shape == (1, 8)
