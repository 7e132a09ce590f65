"""Examples -> (input_ids, labels): the chat template and the loss mask.

Chats go through `data/chat.py`, which cuts each conversation into training texts and the
character spans that carry loss (every assistant turn exactly as the model generates it, with
its reasoning, tool calls and end token); here those texts are tokenized and the spans become
labels. Characters map to tokens through the fast tokenizer's offsets; a token is trained when it
overlaps a span. One raw row may give several examples (a turn whose reasoning the template drops
from history is trained in its own example); all of a row's examples are kept or none. A map batch
is tokenized in one call (`data/tokens.py`), labelled with numpy and handed back as an Arrow table:
no Python object per token.

    ChatML:  <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
    loss:                                                        ^^^^^^^^^^^^^^^^
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa

from sft_cli.data import IGNORE_INDEX
from sft_cli.data.chat import ChatRenderer
from sft_cli.data.formats import RowError, check_trainable, example_hash, normalize
from sft_cli.data.templates import special_tokens
from sft_cli.data.tokens import Encoder, Tokens, ragged_arange


def control_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching any of the tokenizer's special tokens written as text, longest first.

    The tokenizer turns such text into the control token itself: a user message containing
    "<|im_end|>" would end its turn early and inject a fake one. Rows with them are rejected
    (`special_token_in_text`) rather than trained on what inference would parse differently.
    """
    specials = sorted(special_tokens(tokenizer), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def example_texts(example: dict) -> list[tuple[str, str]]:
    """(where, text) of every piece of user data in a normalised example."""
    if example["kind"] == "text":
        return [("text", example["text"])]
    if example["kind"] == "prompt_completion":
        return [("prompt", example["prompt"]), ("completion", example["completion"])]
    texts = []
    for i, m in enumerate(example["messages"]):
        where = f"messages[{i}]"
        if m.get("content"):
            texts.append((f"{where}.content", m["content"]))
        if m.get("reasoning_content"):
            texts.append((f"{where}.reasoning_content", m["reasoning_content"]))
        if m.get("tool_calls"):
            texts.append((f"{where}.tool_calls", json.dumps(m["tool_calls"], ensure_ascii=False)))
    if example.get("tools"):
        texts.append(("tools", json.dumps(example["tools"], ensure_ascii=False)))
    return texts


def _printable(detail: str, limit: int = 300) -> str:
    """Rejection details echo row data: keep them valid UTF-8 (Arrow refuses lone surrogates) and short."""
    return detail.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


# Per-example counts the report sums (see prepare.py). Row-level ones sit on a row's first example.
STAT_COLUMNS = ("rows_with_tools", "tool_calls_trained", "turns_trained", "reasoning_turns_trained",
                "turn_examples", "empty_think_filled", "reasoning_inlined", "reasoning_dropped", "turns_untrained")


class Renderer:
    """Callable for `datasets.map(batched=True, with_indices=True)`: raw rows -> tokenized, masked
    examples (one or more per row) or one rejection per row."""

    def __init__(self, tokenizer, loss_on: str, max_seq_len: int, overlong: str, formats: dict[str, str],
                 columns: dict[str, dict[str, str]], special_ids: set[int], reasoning_turns: str = "all",
                 reasoning_format: str = "inline", template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.encoder = Encoder(tokenizer)
        self.loss_on = loss_on
        self.max_seq_len = max_seq_len
        self.overlong = overlong
        self.formats = formats  # source name -> format
        self.columns = columns  # source name -> column mapping
        self.special_ids = special_ids
        bos = tokenizer.bos_token
        adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
        # Non-chat rows get BOS only if this tokenizer normally adds it, and always EOS.
        self.bos_text = bos if adds_bos else ""
        self.eos_text = tokenizer.eos_token or ""
        self.control_tokens = control_token_pattern(tokenizer)
        self.chat = None
        if tokenizer.chat_template:
            # Longest first: the end of a turn must never fall inside one of these strings.
            markers = [t for t in tokenizer.added_tokens_encoder if len(t) > 1]
            self.chat = ChatRenderer(
                tokenizer.chat_template, dict(tokenizer.special_tokens_map), sorted(special_tokens(tokenizer)),
                markers, loss_on="assistant" if loss_on == "completion" else loss_on,
                reasoning_turns=reasoning_turns, reasoning_format=reasoning_format,
                template_kwargs=template_kwargs)

    def render(self, messages: list[dict], add_generation_prompt: bool, tools=None, kwargs=None) -> str:
        if self.chat is None:
            raise RowError("no_chat_template")
        return self.chat.render(self.chat.for_template(messages, Counter()), add_generation_prompt, tools, kwargs)

    def stop_tokens(self) -> list[str]:
        return self.chat.stop_tokens() if self.chat is not None else []

    def examples(self, example: dict) -> tuple[list[tuple[str, list[tuple[int, int]], list[int], bool]], Counter]:
        """(text, loss spans, tool-call span indices, own) for each example of a row, and its counts."""
        kind = example["kind"]
        if kind == "text":
            text = self.bos_text + example["text"] + self.eos_text
            return [(text, [(0, len(text))], [], False)], Counter()
        if kind == "prompt_completion":
            prompt = self.bos_text + example["prompt"]
            text = prompt + example["completion"] + self.eos_text
            return [(text, [(0 if self.loss_on == "all" else len(prompt), len(text))], [], False)], Counter()
        if self.chat is None:
            raise RowError("no_chat_template")
        cut, stats = self.chat.examples(example)
        return [(e.text, e.spans, e.tool_call_spans, e.own) for e in cut], stats

    def text_and_spans(self, example: dict) -> tuple[str, list[tuple[int, int]]]:
        """The first example of a row as (text, spans): the whole conversation for most rows."""
        text, spans, _, _ = self.examples(example)[0][0]
        return text, spans

    def check_no_control_tokens(self, example: dict) -> None:
        if self.control_tokens is None:
            return
        for where, text in example_texts(example):
            found = self.control_tokens.search(text)
            if found:
                raise RowError("special_token_in_text", f"{where} contains {found.group()!r} at character "
                               f"{found.start()}, which this tokenizer reads as a control token")

    # -- batched map -------------------------------------------------------------------------
    def __call__(self, batch: dict, indices: list[int] | None = None) -> dict:
        """The map's rows as Python lists (what `table` returns, for reading in tests and tools)."""
        return self.table(batch, indices).to_pydict()

    def table(self, batch: dict, indices: list[int] | None = None) -> pa.Table:
        """A batch of raw rows -> their examples (or one rejection per row), as Arrow columns."""
        n = len(batch["raw"])
        indices = list(range(n)) if indices is None else indices
        planned = [self._plan(batch, j) for j in range(n)]
        cuts = [row[0] for row in planned if not isinstance(row, RowError)]
        texts = [text for cut in cuts for text, *_ in cut]
        tokens = self.encoder.encode(texts)
        examples = self._label(tokens, [spans for cut in cuts for _, spans, _, _ in cut],
                               [calls for cut in cuts for _, _, calls, _ in cut])

        out: dict[str, list] = {name: [] for name in OUTPUT_FEATURES if name not in TOKEN_COLUMNS}
        lengths: list[int] = []  # tokens written per output row
        firsts: list[int] = []  # token of `tokens` each output row starts at
        k = 0  # index of the row's first example
        for j, row in enumerate(planned):
            if not isinstance(row, RowError):
                cut, stats, row_hash, kind = row
                first, k = k, k + len(cut)
                # A row is kept whole or not at all.
                row = next((examples.errors[e] for e in range(first, k) if examples.errors[e]), row)
            if isinstance(row, RowError):
                self._append(out, batch, j, indices[j], reason=row.reason, detail=_printable(row.detail))
                lengths.append(0)
                firsts.append(0)
                continue
            for part, e in enumerate(range(first, k)):
                # Several examples of one row differ by part: they must not count as duplicates.
                part_hash = row_hash if part == 0 else example_hash({"row": row_hash, "part": part})
                self._append(out, batch, j, indices[j], hash=part_hash, kind=kind, part=part, own=int(cut[part][3]),
                             num_tokens=int(examples.lengths[e]), num_loss_tokens=int(examples.num_loss[e]),
                             last_loss_id=examples.stops[e][0], stop_ids=sorted(set(examples.stops[e])),
                             **{name: stats.get(name, 0) if part == 0 else 0 for name in STAT_COLUMNS})
                lengths.append(int(examples.lengths[e]))
                firsts.append(int(tokens.bounds[e]))
        return _as_table(out, tokens.ids, examples.labels, np.asarray(firsts, dtype=np.int64),
                         np.asarray(lengths, dtype=np.int64))

    def _plan(self, batch: dict, j: int) -> tuple[list, Counter, int, str] | RowError:
        """Row j of the batch -> (its examples as text and spans, counts, hash, kind), or why not."""
        try:
            if batch["error"][j]:
                reason, _, detail = batch["error"][j].partition(": ")
                raise RowError(reason, detail)
            source = batch["source"][j]
            example = normalize(batch["raw"][j], self.formats[source], self.columns[source])
            check_trainable(example, self.loss_on)
            self.check_no_control_tokens(example)
            cut, stats = self.examples(example)
            return cut, stats, example_hash(example), example["kind"]
        except RowError as exc:
            return exc
        except Exception as exc:  # a bug of ours must cost one counted row, never the whole run
            return RowError("unexpected_error", f"{type(exc).__name__}: {exc}")

    def _label(self, tokens: Tokens, spans: list[list[tuple[int, int]]], call_spans: list[list[int]]) -> Labelled:
        """Labels of every token and, per example, its length, loss-token count, stop ids or error."""
        lengths = np.diff(tokens.bounds)
        kept = np.minimum(lengths, self.max_seq_len)  # overlong examples are cut (or dropped below)
        example = np.repeat(np.arange(len(lengths)), lengths)  # the example each token belongs to
        position = np.arange(len(tokens.ids)) - tokens.bounds[example]
        # Position 0 is never a target: nothing precedes it. Counting it would make the loss-token
        # count (and so the loss normalisation) differ from what training can actually predict.
        trained = in_spans(tokens.starts, tokens.ends, example, spans) & (position > 0) & (position < kept[example])
        labels = np.where(trained, tokens.ids, IGNORE_INDEX).astype(np.int32)
        trained_before = np.concatenate([[0], np.cumsum(trained)])
        num_loss = trained_before[tokens.bounds[1:]] - trained_before[tokens.bounds[:-1]]
        last_trained = np.maximum.accumulate(np.where(trained, np.arange(len(trained)), -1)) if len(trained) else trained
        errors: list[RowError | None] = []
        stops: list[list[int]] = []
        for e, (start, n, limit) in enumerate(zip(tokens.bounds[:-1].tolist(), lengths.tolist(), kept.tolist())):
            error = tokens.errors[e]
            if error is None and n > self.max_seq_len and self.overlong == "drop":
                error = RowError("overlong", f"{n} tokens > max_seq_len {self.max_seq_len}")
            if error is None and num_loss[e] == 0:
                error = RowError("no_loss_tokens", f"{limit} tokens, none trained")
            errors.append(error)
            if error is not None:
                stops.append([])
                continue
            # The tokens that end generation: the example's last trained token, and each tool call's
            # (the model stops there to wait for the result: gpt-oss <|call|>, GLM <|observation|>).
            window = slice(start, start + limit)
            found = [int(tokens.ids[last_trained[start + limit - 1]])]
            for k in call_spans[e]:
                inside = np.flatnonzero(_overlaps(tokens.starts[window], tokens.ends[window], *spans[e][k]))
                found += [int(tokens.ids[start + inside[-1]])] if len(inside) else []
            stops.append(found)
        return Labelled(labels, kept, num_loss, errors, stops)

    @staticmethod
    def _append(out: dict, batch: dict, j: int, row: int, **values) -> None:
        defaults = {"hash": 0, "reason": "", "detail": "", "kind": "", "part": 0, "own": 0, "num_tokens": 0,
                    "num_loss_tokens": 0, "last_loss_id": -1, "stop_ids": []}
        defaults.update({name: 0 for name in STAT_COLUMNS})
        defaults.update(values)
        defaults.update(source=batch["source"][j], location=batch["location"][j], row=row)
        for name, column in out.items():
            column.append(defaults[name])


# The map's output: one row per example, or one per rejected raw row (prepare.py keeps the first
# six columns; the others serve dedupe, the split and the report).
OUTPUT_FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
    "source": datasets.Value("string"), "location": datasets.Value("string"),
    "hash": datasets.Value("int64"), "reason": datasets.Value("string"), "detail": datasets.Value("string"),
    "kind": datasets.Value("string"), "num_tokens": datasets.Value("int32"),
    "num_loss_tokens": datasets.Value("int32"), "last_loss_id": datasets.Value("int64"),
    "row": datasets.Value("int64"), "part": datasets.Value("int32"), "own": datasets.Value("int8"),
    "stop_ids": datasets.Sequence(datasets.Value("int64")),
    **{name: datasets.Value("int32") for name in STAT_COLUMNS},
})
TOKEN_COLUMNS = ("input_ids", "labels")


@dataclass
class Labelled:
    """The labels of a batch's tokens (aligned with Tokens.ids) and, per example, the number of tokens
    it keeps (after max_seq_len), how many carry loss, its stop token ids (the last trained token
    first) and why it cannot be trained (None when it can)."""

    labels: np.ndarray
    lengths: np.ndarray
    num_loss: np.ndarray
    errors: list[RowError | None]
    stops: list[list[int]]


def _as_table(columns: dict[str, list], ids: np.ndarray, labels: np.ndarray, firsts: np.ndarray,
              lengths: np.ndarray) -> pa.Table:
    """Output rows as an Arrow table; row r's tokens are ids[firsts[r]:firsts[r] + lengths[r]]."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(lengths)
    take = ragged_arange(firsts, lengths)
    schema = OUTPUT_FEATURES.arrow_schema
    arrays = {"input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids[take])),
              "labels": pa.ListArray.from_arrays(offsets, pa.array(labels[take]))}
    arrays |= {name: pa.array(values, type=schema.field(name).type) for name, values in columns.items()}
    return pa.Table.from_arrays([arrays[name] for name in schema.names], schema=schema)


def _overlaps(starts: np.ndarray, ends: np.ndarray, lo, hi) -> np.ndarray:
    """Whether tokens [starts, ends) overlap the character span [lo, hi)."""
    # Zero-width tokens (some special tokens) count as the point where they sit.
    return ((starts < hi) & (ends > lo)) | ((starts == ends) & (starts >= lo) & (starts < hi))


def in_spans(starts: np.ndarray, ends: np.ndarray, example: np.ndarray, spans: list[list[tuple[int, int]]]
             ) -> np.ndarray:
    """Whether each token overlaps one of its example's spans (`example[t]` indexes `spans`).

    >>> in_spans(np.array([0, 2, 0, 3]), np.array([2, 4, 3, 5]), np.array([0, 0, 1, 1]), [[(2, 4)], []]).tolist()
    [False, True, False, False]
    """
    inside = np.zeros(len(starts), dtype=bool)
    for rank in range(max(map(len, spans), default=0)):  # the first span of every example, then the second, ...
        # An example with fewer spans gets the empty span (0, 0), which no token overlaps.
        lo, hi = np.array([s[rank] if rank < len(s) else (0, 0) for s in spans], dtype=np.int64).reshape(-1, 2).T
        inside |= _overlaps(starts, ends, lo[example], hi[example])
    return inside


def loss_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """labels[t] = ids[t] where token t overlaps a loss span, else -100.

    >>> loss_labels([5, 6, 7], [(0, 2), (2, 4), (4, 6)], [(2, 6)])
    [-100, 6, 7]
    """
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    inside = in_spans(offs[:, 0], offs[:, 1], np.zeros(len(ids), dtype=np.int64), [spans])
    return np.where(inside, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
