"""Texts put together from separately tokenized pieces equal the texts tokenized whole, token for token
and offset for offset; tokenizers that look at where a piece sits are tokenized whole."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from sft_cli.data.tokens import Encoder, Tokens, control_token_cut, pieces_are_independent, ragged_arange

TEXTS = ["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
         "Hello!  How are you?<|im_end|>\n",
         "<|im_start|>user\n  leading spaces and a <|im_end|> mid-text<|im_end|>",
         "no control tokens at all, 123 digits 🙂 and Ünïcödé",
         "", "<|im_end|><|im_end|>", " <|im_start|> user", "<|im_start|>user\nHi there<|im_end|>\n"]


def as_lists(tokens: Tokens) -> list:
    return [(tokens.ids[a:b].tolist(), tokens.starts[a:b].tolist(), tokens.ends[a:b].tolist())
            for a, b in zip(tokens.bounds[:-1], tokens.bounds[1:])]


def hf_reference(tokenizer, texts):
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(ids, [s for s, _ in offsets], [e for _, e in offsets])
            for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"])]


@pytest.mark.parametrize("family", ["chatml", "llama3", "zephyr"])
def test_pieces_equal_whole_texts_on_the_tiny_tokenizers(tiny_tokenizer, family):
    tok = tiny_tokenizer(family)
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)  # llama3/zephyr lack them
    encoder = Encoder(tok)
    assert encoder.cut is not None  # the fast path is the one under test
    assert as_lists(encoder.encode(TEXTS)) == as_lists(encoder.encode_whole(TEXTS)) == hf_reference(tok, TEXTS)


def test_the_smollm2_tokenizer_is_cut_into_pieces(tmp_path):
    from sft_cli.assets import resolve_model

    try:
        tok = PreTrainedTokenizerFast.from_pretrained(resolve_model("builtin:smollm2-135m-instruct"))
    except Exception:
        pytest.skip("builtin:smollm2-135m-instruct is not available offline")
    encoder = Encoder(tok)
    assert encoder.cut is not None
    assert as_lists(encoder.encode(TEXTS)) == hf_reference(tok, TEXTS)


def word_tokenizer(pre_tokenizer, post_processor=None) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[UNK]", "▁", "▁a", "a", "▁b", "b", "<s>", "</s>", " a", "a "])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizer
    if post_processor is not None:
        backend.post_processor = post_processor
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    return tok


def test_a_tokenizer_that_prepends_only_at_the_start_is_tokenized_whole():
    # Metaspace(prepend_scheme="first") gives "a" after <s> no "▁", but "a" alone (offset 0) one.
    tok = word_tokenizer(pre_tokenizers.Metaspace(prepend_scheme="first"))
    texts = ["a<s>a b</s>b", "<s>a"]
    pieces = Tokens.of(tok.backend_tokenizer.encode_batch(["a", "<s>", "a b", "</s>", "b"],
                                                          add_special_tokens=False), [None] * 5)
    glued = pieces.assemble(np.arange(5), np.array([0, 1, 4, 7, 11]), np.array([5]))
    assert as_lists(glued) != hf_reference(tok, texts[:1])  # why such tokenizers are left whole
    encoder = Encoder(tok)
    assert encoder.cut is None and as_lists(encoder.encode(texts)) == hf_reference(tok, texts)
    always = Encoder(word_tokenizer(pre_tokenizers.Metaspace(prepend_scheme="always")))
    assert always.cut is not None


def test_offset_trimming_that_spares_the_first_token_is_tokenized_whole():
    split = pre_tokenizers.Split(" ", behavior="isolated")
    assert Encoder(word_tokenizer(split, processors.ByteLevel(trim_offsets=True, add_prefix_space=True))).cut is None
    assert Encoder(word_tokenizer(split, processors.ByteLevel(trim_offsets=True, add_prefix_space=False))).cut \
        is not None


def test_tokens_that_take_their_whitespace_are_tokenized_whole(tiny_tokenizer):
    from tokenizers import AddedToken

    tok = tiny_tokenizer("chatml")
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.add_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False)], special_tokens=True)
    encoder = Encoder(tok)
    texts = ["a <mask> b", "<|im_start|>x <mask>"]
    assert control_token_cut(encoder.backend) is None
    assert as_lists(encoder.encode(texts)) == hf_reference(tok, texts)


def test_a_tokenizer_that_reads_control_tokens_as_text_is_tokenized_whole(tiny_tokenizer):
    tok = tiny_tokenizer("chatml")
    tok = tok.__class__.from_pretrained(tok.name_or_path, split_special_tokens=True)
    encoder = Encoder(tok)
    assert encoder.cut is None and as_lists(encoder.encode(TEXTS)) == hf_reference(tok, TEXTS)
    assert hf_reference(tok, TEXTS[:1]) != as_lists(Encoder(tiny_tokenizer("chatml")).encode(TEXTS[:1]))


def test_pieces_are_independent_reads_sequences():
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False}
    first = {"type": "Metaspace", "prepend_scheme": "first"}
    assert pieces_are_independent({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [byte_level]}})
    assert not pieces_are_independent({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [byte_level, first]}})
    assert not pieces_are_independent({"pre_tokenizer": {"type": "SomethingNew"}})
    assert not pieces_are_independent({"model": {"type": "BPE", "dropout": 0.1}})
    assert pieces_are_independent(json.loads(Tokenizer(models.BPE()).to_str()))


def test_ragged_arange():
    assert ragged_arange(np.array([3, 0, 7]), np.array([2, 0, 1])).tolist() == [3, 4, 7]
    assert ragged_arange(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).tolist() == []
