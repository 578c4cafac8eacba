"""FLUX's CLIP and T5 tokenizers from a checkpoint's own files through the ``tokenizers`` library, without the
``transformers`` package: importing it took ~2.4 s of a one-shot FLUX.1-dev process's main thread on an H100
(docs/benchmarks.md). Each builds the same ``tokenizers`` pipeline that transformers' (5.x) ``CLIPTokenizer`` /
``T5Tokenizer`` build from these files, and pads and truncates as their ``__call__`` does, so the ids and masks are
equal (tests/test_tokenizers.py). The loader's ``native_class`` falls back to transformers' class for a folder that
``unsupported_folder`` declines, or with ``DIFFGEN_NATIVE_TOKENIZERS=0``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

from diffgen.errors import ModelLoadError
from diffgen.models.encoders.common import NATIVE_TOKENIZERS_ENV

#: the named special tokens of transformers' tokenizer_config.json
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class TokenizerOutput:
    input_ids: torch.Tensor  # (B, max_length) int64
    attention_mask: torch.Tensor  # (B, max_length) int64: 1 for tokens, 0 for padding


def _token_text(value) -> str | None:
    """A special token's text from tokenizer_config.json (a string or an AddedToken dict)."""
    return value.get("content") if isinstance(value, dict) else value


def _added_token(entry: dict, special: bool | None = None) -> AddedToken:
    return AddedToken(entry["content"], single_word=entry.get("single_word", False), lstrip=entry.get("lstrip", False),
                      rstrip=entry.get("rstrip", False), normalized=entry.get("normalized", False),
                      special=entry.get("special", False) if special is None else special)


class NativeTokenizer:
    """A ``tokenizers.Tokenizer`` that pads and truncates as transformers' tokenizers do for what pipelines ask:
    ``tokenizer(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")``."""

    native_env = NATIVE_TOKENIZERS_ENV
    #: tokenizer_config.json's ``tokenizer_class`` values this class builds (transformers' slow and fast names)
    tokenizer_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backend: Tokenizer, config: dict):
        self.backend = backend
        self.model_max_length = int(config["model_max_length"])
        self.pad_token = _token_text(config.get("pad_token"))
        self.pad_token_id = backend.token_to_id(self.pad_token)

    @classmethod
    def unsupported_folder(cls, folder: Path) -> str | None:
        """Why this tokenizer folder needs transformers' class (None: built here)."""
        config_file = folder / "tokenizer_config.json"
        if not config_file.is_file():
            return "no tokenizer_config.json"
        config = json.loads(config_file.read_text())
        if config.get("tokenizer_class") not in cls.tokenizer_classes:
            return f"tokenizer_class {config.get('tokenizer_class')!r}"
        for side in ("padding_side", "truncation_side"):
            if config.get(side, "right") != "right":
                return f"{side} {config[side]!r}"
        if not isinstance(config.get("model_max_length"), int) or config["model_max_length"] > 100_000:
            return f"model_max_length {config.get('model_max_length')!r}"
        pad = _token_text(config.get("pad_token"))
        if pad is None:
            return "no pad_token"
        return cls._unsupported_files(folder, config)

    @classmethod
    def _unsupported_files(cls, folder: Path, config: dict) -> str | None:
        raise NotImplementedError

    @classmethod
    def from_folder(cls, folder: str | Path) -> NativeTokenizer:
        folder = Path(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        backend = cls._build(folder, config)
        cls._add_tokens(backend, config)
        tokenizer = cls(backend, config)
        if tokenizer.pad_token_id is None:
            raise ModelLoadError(f"{folder}: pad_token {tokenizer.pad_token!r} is not in the vocabulary")
        return tokenizer

    @classmethod
    def _build(cls, folder: Path, config: dict) -> Tokenizer:
        raise NotImplementedError

    @classmethod
    def _extra_special_tokens(cls, config: dict) -> list:
        return list(config.get("extra_special_tokens") or config.get("additional_special_tokens") or [])

    @classmethod
    def _add_tokens(cls, backend: Tokenizer, config: dict) -> None:
        """The added tokens transformers registers: those of ``added_tokens_decoder`` (with their flags, by id), then
        the named and extra special tokens not yet among them (special, not normalized)."""
        entries = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda item: int(item[0]))
        added = [_added_token(entry) for _, entry in entries]
        known = {token.content for token in added}
        for value in [config.get(key) for key in SPECIAL_TOKEN_KEYS] + cls._extra_special_tokens(config):
            text = _token_text(value)
            if text is not None and text not in known:
                added.append(_added_token(value, special=True) if isinstance(value, dict)
                             else AddedToken(text, special=True, normalized=False))
                known.add(text)
        backend.add_tokens(added)

    def __call__(self, texts: str | list[str], padding: str = "max_length", max_length: int | None = None,
                 truncation: bool = False, return_tensors: str = "pt") -> TokenizerOutput:
        """Ids and attention masks of ``texts`` padded on the right to ``max_length`` (default ``model_max_length``),
        and with ``truncation`` cut to it (the special tokens included), as transformers' tokenizers do."""
        if padding != "max_length" or truncation not in (True, False) or return_tensors != "pt":
            raise ValueError(f"{type(self).__name__} pads to max_length (return_tensors='pt', truncation True or "
                             f"False); got padding={padding!r}, truncation={truncation!r}, "
                             f"return_tensors={return_tensors!r}")
        length = self.model_max_length if max_length is None else int(max_length)
        texts = [texts] if isinstance(texts, str) else list(texts)
        # what transformers' TokenizersBackend sets on its backend for these arguments
        if truncation:
            self.backend.enable_truncation(length, stride=0, strategy="longest_first", direction="right")
        else:
            self.backend.no_truncation()
        self.backend.enable_padding(direction="right", pad_id=self.pad_token_id, pad_type_id=0,
                                    pad_token=self.pad_token, length=length)
        encodings = self.backend.encode_batch(texts, add_special_tokens=True)
        return TokenizerOutput(torch.tensor([e.ids for e in encodings], dtype=torch.long),
                               torch.tensor([e.attention_mask for e in encodings], dtype=torch.long))


class CLIPTokenizer(NativeTokenizer):
    """CLIP's byte-level BPE (words end in ``</w>``), lower-cased, ``<|startoftext|> ... <|endoftext|>``; from
    vocab.json + merges.txt (the hub's FLUX layout) or a tokenizer.json's vocabulary and merges."""

    tokenizer_classes = ("CLIPTokenizer", "CLIPTokenizerFast")
    # transformers' CLIPTokenizer: words are letter runs, single digits, punctuation runs and English contractions
    WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    @classmethod
    def _unsupported_files(cls, folder: Path, config: dict) -> str | None:
        if not ((folder / "tokenizer.json").is_file()
                or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
            return "neither tokenizer.json nor vocab.json + merges.txt"
        return None

    @classmethod
    def text_steps(cls, backend: Tokenizer) -> Tokenizer:
        """CLIP's text steps before BPE: NFC, whitespace runs to one space, lower case; words split by its regex,
        then bytes (the test vocabularies are trained with these very steps)."""
        backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                   normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(cls.WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        return backend

    @classmethod
    def _build(cls, folder: Path, config: dict) -> Tokenizer:
        options = dict(dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
                       unk_token=_token_text(config.get("unk_token", "<|endoftext|>")))
        tokenizer_json = folder / "tokenizer.json"
        if tokenizer_json.is_file():
            model = _model_of(tokenizer_json, json.loads(tokenizer_json.read_text()), "BPE")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            bpe = BPE(vocab=model["vocab"], merges=merges, **options)
        else:  # read by the library itself: no Python dict of the 49408 tokens (half the load time)
            bpe = BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"), **options)
        backend = cls.text_steps(Tokenizer(bpe))
        bos, eos = (_token_text(config.get(key, default)) for key, default in
                    (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>")))
        ids = {token: backend.token_to_id(token) for token in (bos, eos)}
        if None in ids.values():
            raise ModelLoadError(f"{folder}: the vocabulary lacks {bos!r} or {eos!r}")
        backend.post_processor = processors.RobertaProcessing((eos, ids[eos]), (bos, ids[bos]), trim_offsets=False,
                                                              add_prefix_space=False)
        return backend


class T5Tokenizer(NativeTokenizer):
    """T5's SentencePiece Unigram from tokenizer.json (its vocabulary and the precompiled normalisation map), split
    on whitespace with ``▁`` prepended to each word, ``</s>`` appended."""

    tokenizer_classes = ("T5Tokenizer", "T5TokenizerFast")

    @classmethod
    def _extra_special_tokens(cls, config: dict) -> list:
        """As transformers' T5Tokenizer: without a list, ``extra_ids`` (default 100) sentinels ``<extra_id_i>``."""
        return super()._extra_special_tokens(config) or [f"<extra_id_{i}>" for i in range(config.get("extra_ids", 100))]

    @classmethod
    def _unsupported_files(cls, folder: Path, config: dict) -> str | None:
        return None if (folder / "tokenizer.json").is_file() else "no tokenizer.json (a spiece.model alone)"

    @classmethod
    def _build(cls, folder: Path, config: dict) -> Tokenizer:
        spec = json.loads((folder / "tokenizer.json").read_text())
        model = _model_of(folder / "tokenizer.json", spec, "Unigram")
        # as transformers' T5Tokenizer: <unk> at id 2 and no byte fallback, whatever the file says
        backend = Tokenizer(Unigram([tuple(piece) for piece in model["vocab"]], unk_id=2, byte_fallback=False))
        charsmap = _precompiled_charsmap(spec.get("normalizer"))
        if charsmap is not None:
            backend.normalizer = normalizers.Precompiled(charsmap)
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
        eos = _token_text(config.get("eos_token", "</s>"))
        backend.post_processor = processors.TemplateProcessing(
            single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, backend.token_to_id(eos))])
        return backend


def _model_of(tokenizer_json: Path, spec: dict, kind: str) -> dict:
    """The ``model`` section of ``spec`` (the parsed ``tokenizer_json``), which must be a ``kind`` model (checked
    here, while building, rather than in ``unsupported_folder``: that runs before the loader starts its weight
    reads, and parsing the file there would delay them)."""
    model = spec["model"]
    if model.get("type") != kind:
        raise ModelLoadError(f"{tokenizer_json}: a {kind} model expected for this tokenizer class, found "
                         f"{model.get('type')!r}")
    return model


def _precompiled_charsmap(normalizer: dict | None) -> bytes | None:
    """SentencePiece's normalisation map from a tokenizer.json's normalizer (alone or in a Sequence), as
    transformers takes it (the other normalizers of the file are not used: they were whitespace rules that the
    whitespace split makes moot)."""
    if not normalizer:
        return None
    parts = normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts:
        if part.get("type") == "Precompiled" and "precompiled_charsmap" in part:
            return base64.b64decode(part["precompiled_charsmap"])
    return None
