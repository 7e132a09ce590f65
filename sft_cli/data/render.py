"""Examples -> (input_ids, labels): the chat template and the loss mask.

Chats go through `data/chat.py`, which cuts each conversation into training texts and the
character spans that carry loss (every assistant turn exactly as the model generates it, with
its reasoning, tool calls and end token); here those texts are tokenized and the spans become
labels. Characters map to tokens through the fast tokenizer's offsets; a token is trained when it
overlaps a span. One raw row may give several examples (a turn whose reasoning the template drops
from history is trained in its own example); all of a row's examples are kept or none.

    ChatML:  <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
    loss:                                                        ^^^^^^^^^^^^^^^^
"""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np

from sft_cli.data import IGNORE_INDEX
from sft_cli.data.chat import ChatRenderer
from sft_cli.data.formats import RowError, check_trainable, example_hash, normalize
from sft_cli.data.templates import special_tokens


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

    def _encode(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]] | RowError]:
        """Tokenize in one batched call; if the batch fails, row by row so one bad text costs one row."""
        # add_special_tokens=False: the template (or bos_text) already wrote BOS, so it is never doubled.
        kwargs = {"add_special_tokens": False, "return_offsets_mapping": True, "return_attention_mask": False}
        try:
            encoded = self.tokenizer(texts, **kwargs)
            return list(zip(encoded["input_ids"], encoded["offset_mapping"]))
        except Exception:
            pass
        results = []
        for text in texts:
            try:
                one = self.tokenizer(text, **kwargs)
                results.append((one["input_ids"], one["offset_mapping"]))
            except Exception as exc:
                results.append(RowError("tokenizer_error", f"{type(exc).__name__}: {exc}"))
        return results

    # -- batched map -------------------------------------------------------------------------
    def __call__(self, batch: dict, indices: list[int] | None = None) -> dict:
        n = len(batch["raw"])
        indices = list(range(n)) if indices is None else indices
        planned = []  # per row: (examples, stats, hash, kind) or a RowError
        for j in range(n):
            try:
                if batch["error"][j]:
                    reason, _, detail = batch["error"][j].partition(": ")
                    raise RowError(reason, detail)
                source = batch["source"][j]
                example = normalize(batch["raw"][j], self.formats[source], self.columns[source])
                check_trainable(example, self.loss_on)
                self.check_no_control_tokens(example)
                cut, stats = self.examples(example)
                planned.append((cut, stats, example_hash(example), example["kind"]))
            except RowError as exc:
                planned.append(exc)
            except Exception as exc:  # a bug of ours must cost one counted row, never the whole run
                planned.append(RowError("unexpected_error", f"{type(exc).__name__}: {exc}"))
        texts = [text for row in planned if not isinstance(row, RowError) for text, *_ in row[0]]
        encoded = iter(self._encode(texts) if texts else [])

        out: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
        for j, row in enumerate(planned):
            if not isinstance(row, RowError):
                cut, stats, row_hash, kind = row
                results = [self._tokens(next(encoded), spans, call_spans) for _, spans, call_spans, _ in cut]
                row = next((r for r in results if isinstance(r, RowError)), row)  # a row is kept whole or not at all
            if isinstance(row, RowError):
                self._append(out, batch, j, indices[j], reason=row.reason, detail=_printable(row.detail))
                continue
            for part, ((_, _, _, own), (ids, labels, stop_ids)) in enumerate(zip(cut, results)):
                supervised = [t for t in labels if t != IGNORE_INDEX]
                # Several examples of one row differ by part: they must not count as duplicates.
                part_hash = row_hash if part == 0 else example_hash({"row": row_hash, "part": part})
                self._append(out, batch, j, indices[j], input_ids=ids, labels=labels, hash=part_hash, kind=kind,
                             part=part, own=int(own), num_tokens=len(ids), num_loss_tokens=len(supervised),
                             last_loss_id=supervised[-1], stop_ids=stop_ids,
                             **{name: stats.get(name, 0) if part == 0 else 0 for name in STAT_COLUMNS})
        return out

    def _tokens(self, encoded, spans, call_spans):
        """(ids, labels, stop ids) of one example, or RowError."""
        if isinstance(encoded, RowError):
            return encoded
        ids, offsets = encoded
        labels = loss_labels(ids, offsets, spans)
        # Position 0 is never a target: nothing precedes it. Counting it would make the loss-token
        # count (and so the loss normalisation) differ from what training can actually predict.
        labels[0] = IGNORE_INDEX
        if len(ids) > self.max_seq_len:
            if self.overlong == "drop":
                return RowError("overlong", f"{len(ids)} tokens > max_seq_len {self.max_seq_len}")
            ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
        if all(t == IGNORE_INDEX for t in labels):
            return RowError("no_loss_tokens", f"{len(ids)} tokens, none trained")
        # The tokens that end generation: the example's last trained token, and each tool call's
        # (the model stops there to wait for the result: gpt-oss <|call|>, GLM <|observation|>).
        stops = {next(t for t in reversed(labels) if t != IGNORE_INDEX)}
        for k in call_spans:
            last = _last_token_in(offsets, spans[k], len(ids))
            if last is not None:
                stops.add(int(ids[last]))
        return list(ids), labels, sorted(stops)

    @staticmethod
    def _append(out: dict, batch: dict, j: int, row: int, **values) -> None:
        defaults = {"input_ids": [], "labels": [], "hash": 0, "reason": "", "detail": "", "kind": "", "part": 0,
                    "own": 0, "num_tokens": 0, "num_loss_tokens": 0, "last_loss_id": -1, "stop_ids": []}
        defaults.update({name: 0 for name in STAT_COLUMNS})
        defaults.update(values)
        defaults.update(source=batch["source"][j], location=batch["location"][j], row=row)
        for name in OUTPUT_COLUMNS:
            out[name].append(defaults[name])


OUTPUT_COLUMNS = ("input_ids", "labels", "source", "location", "row", "part", "own", "hash", "reason", "detail",
                  "kind", "num_tokens", "num_loss_tokens", "last_loss_id", "stop_ids", *STAT_COLUMNS)


def _last_token_in(offsets, span: tuple[int, int], limit: int) -> int | None:
    """Index of the last token overlapping a character span (None when truncated away)."""
    lo, hi = span
    for t in range(min(len(offsets), limit) - 1, -1, -1):
        start, end = offsets[t]
        if start < hi and (end > lo or start == end >= lo):
            return t
    return None


def loss_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """labels[t] = ids[t] where token t overlaps a loss span, else -100.

    >>> loss_labels([5, 6, 7], [(0, 2), (2, 4), (4, 6)], [(2, 6)])
    [-100, 6, 7]
    """
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offs[:, 0], offs[:, 1]
    keep = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        # Zero-width tokens (some special tokens) count as the point where they sit.
        keep |= ((starts < hi) & (ends > lo)) | ((starts == ends) & (starts >= lo) & (starts < hi))
    return np.where(keep, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
