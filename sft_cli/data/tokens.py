"""Texts -> token ids and character offsets, in bulk, exactly as `tokenizer(texts, add_special_tokens=False)`.

A fast tokenizer first cuts a text at its control tokens (`<|im_start|>`, `<|im_end|>`, ...: the
added tokens it matches before normalizing) and tokenizes each piece on its own, so a piece gives
the same tokens wherever it sits. The training texts of a batch repeat many pieces (a conversation's
examples share their history, every row of a dataset its tool schemas and system prompts), so each
distinct piece is tokenized once and the texts are put together from their pieces. That holds for
every tokenizer whose later steps ignore where a piece sits; the few whose steps look at it (see
`pieces_are_independent`) get whole texts tokenized.

    tokens = Encoder(tokenizer).encode(["<|im_start|>user\\nHi<|im_end|>\\n", ...])
    tokens.ids[tokens.bounds[0]:tokens.bounds[1]]  # the first text's token ids
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from itertools import chain

import numpy as np

from sft_cli.data.formats import RowError

# Pre-tokenizers and post-processors that treat every piece alike, wherever it sits in the text.
# Metaspace(prepend_scheme="first") prepends only at offset 0, and ByteLevel/Roberta offset trimming
# with add_prefix_space spares a text's first token: both see the position (handled in _position_free).
PIECEWISE_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit",
                            "BertPreTokenizer", "CharDelimiterSplit", "UnicodeScripts", "Metaspace", "FixedLength",
                            "Sequence"}
PIECEWISE_POST_PROCESSORS = {"TemplateProcessing", "BertProcessing", "RobertaProcessing", "ByteLevel", "Sequence"}


def ragged_arange(firsts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The ranges [firsts[i], firsts[i] + lengths[i]) end to end.

    >>> ragged_arange(np.array([5, 0]), np.array([2, 3])).tolist()
    [5, 6, 0, 1, 2]
    """
    ends = np.cumsum(lengths)
    return np.repeat(firsts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


@dataclass
class Tokens:
    """Texts tokenized end to end: text k's tokens are ids[bounds[k]:bounds[k + 1]], token t covering
    characters [starts[t], ends[t]) of its text. errors[k] is set (and text k has no tokens) when it
    could not be tokenized."""

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    bounds: np.ndarray
    errors: list[RowError | None]

    @classmethod
    def of(cls, encodings: list, errors: list[RowError | None]) -> Tokens:
        """From `tokenizers` Encodings (None where a text failed), read in bulk: no per-token Python loop."""
        done = [e for e in encodings if e is not None]
        bounds = np.zeros(len(encodings) + 1, dtype=np.int64)
        bounds[1:] = np.cumsum([len(e) if e is not None else 0 for e in encodings])
        total = int(bounds[-1])
        ids = np.fromiter(chain.from_iterable(e.ids for e in done), dtype=np.int32, count=total)
        offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in done)), dtype=np.int64,
                              count=2 * total).reshape(total, 2)
        return cls(ids, offsets[:, 0], offsets[:, 1], bounds, errors)

    def assemble(self, which: np.ndarray, shifts: np.ndarray, counts: np.ndarray) -> Tokens:
        """Texts put together from these pieces: text k is the next counts[k] entries of `which`
        (piece indices), each piece placed at character shifts[i] of its text."""
        lengths = np.diff(self.bounds)[which]
        take = ragged_arange(self.bounds[which], lengths)
        shift = np.repeat(shifts, lengths)
        ends = np.concatenate([[0], np.cumsum(lengths)])  # token bound of each piece in the texts
        bounds = ends[np.concatenate([[0], np.cumsum(counts)])]
        return Tokens(self.ids[take], self.starts[take] + shift, self.ends[take] + shift, bounds,
                      [None] * len(counts))


def _nodes(config) -> list[dict]:
    """Every component of a tokenizer.json part (a Sequence's members included)."""
    if isinstance(config, list):
        return [node for item in config for node in _nodes(item)]
    if not isinstance(config, dict):
        return []
    inner = [node for key in ("pretokenizers", "processors") for node in _nodes(config.get(key))]
    return ([config] if "type" in config else []) + inner


def _position_free(node: dict) -> bool:
    if node["type"] == "Metaspace":
        return node.get("prepend_scheme", "always") != "first"
    if node["type"] in ("ByteLevel", "RobertaProcessing"):
        return not (node.get("trim_offsets") and node.get("add_prefix_space"))
    return True


def pieces_are_independent(config: dict) -> bool:
    """Whether this tokenizer (its tokenizer.json, parsed) tokenizes each piece between control tokens
    the same wherever the piece sits: so texts can be put together from separately tokenized pieces.
    Normalizers and models always work piece by piece; only some pre-tokenizers and post-processors
    (and BPE dropout, which is random) do not."""
    pre, post = _nodes(config.get("pre_tokenizer")), _nodes(config.get("post_processor"))
    return (all(n["type"] in PIECEWISE_PRE_TOKENIZERS and _position_free(n) for n in pre)
            and all(n["type"] in PIECEWISE_POST_PROCESSORS and _position_free(n) for n in post)
            and not (config.get("model") or {}).get("dropout"))


def _components(backend) -> dict:
    """The tokenizer.json parts `pieces_are_independent` reads, without serialising the vocabulary."""
    def state(component):
        return json.loads(component.__getstate__()) if component is not None else None

    return {"pre_tokenizer": state(backend.pre_tokenizer), "post_processor": state(backend.post_processor),
            "model": {"dropout": getattr(backend.model, "dropout", None)}}


def control_token_cut(backend) -> re.Pattern | None:
    """A regex matching the added tokens a tokenizer cuts texts at (leftmost, longest first, as its own
    matcher does), or None when pieces cannot be tokenized apart: a token that also takes the
    whitespace beside it (lstrip/rstrip) or only matches whole words, or a tokenizer that does not cut."""
    added = [t for t in backend.get_added_tokens_decoder().values() if not t.normalized]
    if not added or backend.encode_special_tokens or any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    if not pieces_are_independent(_components(backend)):
        return None
    return re.compile("|".join(re.escape(t.content) for t in sorted(added, key=lambda t: -len(t.content))))


def _pieces(text: str, cut: re.Pattern) -> list[tuple[int, str]]:
    """(start, piece) of a text cut before and after every control token, empty pieces left out."""
    pieces, at = [], 0
    for match in cut.finditer(text):
        if match.start() > at:
            pieces.append((at, text[at:match.start()]))
        pieces.append((match.start(), match.group()))
        at = match.end()
    if at < len(text):
        pieces.append((at, text[at:]))
    return pieces


class Encoder:
    """`tokenizer(texts, add_special_tokens=False)` for whole batches (see module docstring)."""

    def __init__(self, tokenizer):
        # That call turns off any truncation or padding a tokenizer.json sets, and reads control tokens
        # as text only when the tokenizer says so (split_special_tokens): so does this copy.
        self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        self.cut = control_token_cut(self.backend)

    def encode(self, texts: list[str]) -> Tokens:
        if self.cut is not None:
            try:
                return self._by_pieces(texts)
            except Exception:  # a piece the tokenizer refuses: whole texts say which row it costs
                pass
        return self.encode_whole(texts)

    def _by_pieces(self, texts: list[str]) -> Tokens:
        index: dict[str, int] = {}  # distinct piece -> its position in `index`
        which, shifts, counts = [], [], []
        for text in texts:
            pieces = _pieces(text, self.cut)
            counts.append(len(pieces))
            for start, piece in pieces:
                which.append(index.setdefault(piece, len(index)))
                shifts.append(start)
        encoded = Tokens.of(self.backend.encode_batch(list(index), add_special_tokens=False), [None] * len(index))
        return encoded.assemble(np.asarray(which, dtype=np.int64), np.asarray(shifts, dtype=np.int64),
                                np.asarray(counts, dtype=np.int64))

    def encode_whole(self, texts: list[str]) -> Tokens:
        """Each text tokenized as it is; if the batch fails, text by text so one bad text costs one row."""
        try:
            return Tokens.of(self.backend.encode_batch(texts, add_special_tokens=False), [None] * len(texts))
        except Exception:
            pass
        encodings, errors = [], []
        for text in texts:
            try:
                encodings.append(self.backend.encode(text, add_special_tokens=False))
                errors.append(None)
            except Exception as exc:
                encodings.append(None)
                errors.append(RowError("tokenizer_error", f"{type(exc).__name__}: {exc}"))
        return Tokens.of(encodings, errors)
