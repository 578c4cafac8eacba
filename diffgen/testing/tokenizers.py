"""Tokenizers built in memory from a tiny synthetic vocabulary: no hub, no sentencepiece files."""

from __future__ import annotations

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
