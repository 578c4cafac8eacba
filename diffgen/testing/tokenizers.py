"""Tokenizers for tests and benches, made offline: tiny synthetic vocabularies built in memory, and folders with
vocabularies of the real sizes (no hub, no sentencepiece files)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import pre_tokenizers

PRINTABLE = [chr(i) for i in range(33, 127)]


def byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def clip_tokenizer(max_length: int = 77):
    """Byte-level CLIP BPE without merges (one token per byte); bos=0, eos=pad=1."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in byte_alphabet():
            vocab.setdefault(ch + suffix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    """T5/UMT5-style Unigram: <pad>=0, </s>=1, <unk>=2, then single characters with and without '▁'."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in PRINTABLE] + [("▁" + c, -4.0) for c in PRINTABLE]
    return T5Tokenizer(vocab=vocab, extra_ids=0, additional_special_tokens=[], model_max_length=max_length)


LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def llama_tokenizer(max_length: int = 4096, llava: bool = False):
    """Llama BPE without merges (one token per printable character, byte fallback), with Llama-3's chat tokens.

    ``llava``: also a BOS token and ``<image>``, and "system" and a blank line as single tokens, so that
    ``<image>`` sits at index 5 of the HunyuanVideo-I2V template as with the real tokenizer.
    """
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for ch in ["▁", *PRINTABLE, *LLAMA3_SPECIAL_TOKENS]:
        vocab.setdefault(ch, len(vocab))
    # padding_side "right" as the HunyuanVideo repositories save it (the reference crops the template from the left)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], pad_token="<pad>", model_max_length=max_length,
                               padding_side="right", add_bos_token=llava)
    specials = [*LLAMA3_SPECIAL_TOKENS, "<image>"] if llava else LLAMA3_SPECIAL_TOKENS
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t in specials]})
    if llava:
        tokenizer.add_tokens([AddedToken(word, normalized=False) for word in ("system", "\n\n")])
    return tokenizer


# -- tokenizer folders of the real sizes, laid out as FLUX.1-dev's (the real vocabularies are not available offline)

#: the hub's tokenizer_config.json of FLUX.1-dev's CLIP tokenizer (vocab.json + merges.txt beside it)
FLUX_CLIP_CONFIG = {
    "add_prefix_space": False,
    "added_tokens_decoder": {
        "49406": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False, "special": True},
        "49407": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False, "special": True}},
    "bos_token": "<|startoftext|>", "clean_up_tokenization_spaces": True, "do_lower_case": True,
    "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77, "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>",
}
T5_SENTINELS = [f"<extra_id_{i}>" for i in range(100)]
#: the hub's tokenizer_config.json of FLUX.1-dev's T5 tokenizer (tokenizer.json beside it)
FLUX_T5_CONFIG = {
    "additional_special_tokens": T5_SENTINELS, "clean_up_tokenization_spaces": True, "eos_token": "</s>",
    "extra_ids": 100, "legacy": True, "model_max_length": 512, "pad_token": "<pad>", "sp_model_kwargs": {},
    "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>",
}


def clip_hub_folder(folder, vocab: dict[str, int], merges: list):
    """FLUX.1-dev's CLIP tokenizer folder: vocab.json, merges.txt (no tokenizer.json) and its tokenizer_config.json,
    the two special tokens last in ``vocab`` as in the real one."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = [" ".join(m) if not isinstance(m, str) else m for m in merges]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(line + "\n" for line in lines))
    bos, eos = len(vocab) - 2, len(vocab) - 1
    decoder = FLUX_CLIP_CONFIG["added_tokens_decoder"]
    config = {**FLUX_CLIP_CONFIG, "added_tokens_decoder": {str(bos): decoder["49406"], str(eos): decoder["49407"]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def made_up_words(count: int, seed: int = 0) -> list[str]:
    """Seeded made-up words (Latin letters with some accented and Greek ones), in lines of 12."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz" * 4 + "éèàüöñçøåßαβγδ"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 11))) for _ in range(count)]
    return [" ".join(words[i:i + 12]) for i in range(0, count, 12)]


def torch_sources(megabytes: float) -> list[str]:
    """Text of torch's own Python sources (tens of MB in every install), in a fixed order."""
    import torch

    texts, size = [], 0
    for path in sorted(Path(torch.__file__).parent.glob("**/*.py")):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        size += len(texts[-1])
        if size > megabytes * 1e6:
            break
    return texts


def real_size_clip_folder(folder):
    """A CLIP-style byte-level BPE of CLIP's size (49406 tokens + the two specials), trained with CLIP's normaliser
    and word split on 10 MB of torch's sources and 300k made-up words (with those, the trainer reaches the size
    whatever the installation holds; a few seconds), in FLUX.1-dev's layout."""

    from tokenizers import Tokenizer, models, trainers

    from diffgen.models.encoders.tokenizers import CLIPTokenizer

    trainer_tokenizer = CLIPTokenizer.text_steps(
        Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="")))
    trainer = trainers.BpeTrainer(vocab_size=49406, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)
    trainer_tokenizer.train_from_iterator(torch_sources(10) + made_up_words(300_000), trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return clip_hub_folder(folder, vocab, model["merges"])


def real_size_t5_folder(folder, pieces: int = 32000, seed: int = 0):
    """A T5-style Unigram tokenizer.json of T5's size (<pad> </s> <unk> ▁, made-up pieces with made-up scores, the
    100 sentinels last: 32100 in all) with FLUX.1-dev's tokenizer_config.json. For load times: the pieces are not a
    trained vocabulary."""

    from tokenizers import AddedToken, Tokenizer, models

    rng = random.Random(seed)
    vocab, seen = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)], {"<pad>", "</s>", "<unk>", "▁"}
    for ch in PRINTABLE:
        for piece in (ch, "▁" + ch):
            vocab.append((piece, -10.0))
            seen.add(piece)
    while len(vocab) < pieces:
        piece = "▁" * (rng.random() < 0.6) + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in
                                                     range(rng.randint(2, 9)))
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, -rng.uniform(5.0, 15.0)))
    vocab += [(token, 0.0) for token in reversed(T5_SENTINELS)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in ("<pad>", "</s>", "<unk>", *T5_SENTINELS)])
    folder = Path(folder)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(FLUX_T5_CONFIG))
    return folder
