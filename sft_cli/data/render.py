"""Examples -> (input_ids, labels): the chat template and the loss mask.

The mask comes from the rendered text, so it works with any Hugging Face chat
template, with or without `{% generation %}` markers. For each assistant turn i:

    prompt_i = template(messages[:i], add_generation_prompt=True)   # what inference sees
    upto_i   = template(messages[:i+1])
    full     = template(messages)

`full` must start with `prompt_i`, and the turn's loss span runs from there to
where `upto_i` and `full` part ways, trailing whitespace cut: the reply plus the
tokens that close it (`<|im_end|>`, `<|eot_id|>`, `</s>`), so the model learns to
stop. A template that renders an old turn unlike a live one (reasoning templates
drop old thoughts) leaves that turn untrained; if the last turn does not match
what inference would see, the row is rejected as `template_mismatch`.
Characters map to tokens through the fast tokenizer's offsets; a token is trained
when it overlaps a span.

    ChatML:  <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
    loss:                                                        ^^^^^^^^^^^^^^^^
"""

from __future__ import annotations

import re

import numpy as np

from sft_cli.data.formats import RowError, check_trainable, example_hash, normalize
from sft_cli.data.templates import special_tokens

IGNORE_INDEX = -100


def _compile(template: str):
    try:  # transformers' own compiled environment: same globals (raise_exception, strftime_now, ...)
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template)
    except ImportError:  # pragma: no cover - older/newer transformers
        # Sandboxed like transformers' own: a template from a downloaded tokenizer must not reach
        # Python internals (`''.__class__.__mro__`).
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


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
    return [(f"messages[{i}].content", m["content"]) for i, m in enumerate(example["messages"])]


def _printable(detail: str, limit: int = 300) -> str:
    """Rejection details echo row data: keep them valid UTF-8 (Arrow refuses lone surrogates) and short."""
    return detail.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


class Renderer:
    """Callable for `datasets.map(batched=True)`: raw rows -> tokenized, masked rows or rejections."""

    def __init__(self, tokenizer, loss_on: str, max_seq_len: int, overlong: str, formats: dict[str, str],
                 columns: dict[str, dict[str, str]], special_ids: set[int]):
        self.tokenizer = tokenizer
        self.loss_on = loss_on
        self.max_seq_len = max_seq_len
        self.overlong = overlong
        self.formats = formats  # source name -> format
        self.columns = columns  # source name -> column mapping
        self.special_ids = special_ids
        # The same variables apply_chat_template passes, so prompts match inference exactly.
        self.template_vars = dict(tokenizer.special_tokens_map)
        bos = tokenizer.bos_token
        adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
        # Non-chat rows get BOS only if this tokenizer normally adds it, and always EOS.
        self.bos_text = bos if adds_bos else ""
        self.eos_text = tokenizer.eos_token or ""
        # Longest first: the end of a turn must never fall inside one of these strings.
        self.markers = sorted((t for t in tokenizer.added_tokens_encoder if len(t) > 1), key=len, reverse=True)
        self.control_tokens = control_token_pattern(tokenizer)
        self._compiled = None
        self._parts = None  # does the template want content as [{"type": "text", "text": ...}]?

    def __getstate__(self):  # compiled jinja does not pickle; each worker compiles its own
        return {**self.__dict__, "_compiled": None}

    # -- text and character spans ------------------------------------------------------------
    def _render_raw(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self._compiled is None:
            self._compiled = _compile(self.tokenizer.chat_template)
        if self._parts:
            messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self.template_vars)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self.tokenizer.chat_template:
            raise RowError("no_chat_template")
        if self._parts is None:
            self._parts = self._wants_parts()
        try:
            return self._render_raw(messages, add_generation_prompt)
        except Exception as exc:  # the template's own raise_exception, or a jinja error
            raise RowError("template_error", str(exc).splitlines()[0][:200]) from None

    def _wants_parts(self) -> bool:
        """Multimodal templates iterate content parts and silently drop a plain string."""
        probe = [{"role": "user", "content": "zq1"}, {"role": "assistant", "content": "zq2"}]
        self._parts = False
        try:
            if "zq2" in self._render_raw(probe, False):
                return False
            self._parts = True
            return "zq2" in self._render_raw(probe, False)
        except Exception:
            return False

    def text_and_spans(self, example: dict) -> tuple[str, list[tuple[int, int]]]:
        """The example as one string, and the [start, end) character spans that carry loss."""
        kind = example["kind"]
        if kind == "text":
            text = self.bos_text + example["text"] + self.eos_text
            return text, [(0, len(text))]
        if kind == "prompt_completion":
            prompt = self.bos_text + example["prompt"]
            text = prompt + example["completion"] + self.eos_text
            return text, [(0 if self.loss_on == "all" else len(prompt), len(text))]

        messages = example["messages"]
        full = self.render(messages, add_generation_prompt=False)
        if self.loss_on == "all":
            return full, [(0, len(full))]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= example["completion_start"]]
        if self.loss_on == "last_assistant":
            turns = turns[-1:]
        spans = []
        for i in turns:
            last = i == len(messages) - 1
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = full if last else self.render(messages[: i + 1], add_generation_prompt=False)
            # The turn ends where "conversation so far" and "whole conversation" part ways: a
            # template may close a conversation differently from a turn (Phi-3 appends EOS).
            end = _snap_before_marker(full, _common_prefix_len(upto, full), self.markers)
            reply = full[len(prompt):end] if full.startswith(prompt) else ""
            if messages[i]["content"].strip() not in reply:
                if last:
                    at = _common_prefix_len(prompt, full)
                    raise RowError("template_mismatch", f"turn {i}: the inference prompt continues with "
                                   f"{prompt[at:at + 24]!r} but the conversation with {full[at:at + 24]!r} "
                                   "(e.g. a template that forces '<think>' on data without reasoning)")
                # A template that rewrites history (reasoning models drop old thoughts) renders this
                # turn unlike what the model generates live: training on it would teach the wrong thing.
                continue
            spans.append((len(prompt), len(prompt) + len(reply.rstrip())))
        if not spans:
            raise RowError("template_mismatch", "no assistant turn renders as it would be generated")
        return full, spans

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
    def __call__(self, batch: dict) -> dict:
        n = len(batch["raw"])
        out = {"input_ids": [[] for _ in range(n)], "labels": [[] for _ in range(n)],
               "source": batch["source"], "location": batch["location"],
               "hash": [0] * n, "reason": [""] * n, "detail": [""] * n, "kind": [""] * n,
               "num_tokens": [0] * n, "num_loss_tokens": [0] * n, "last_loss_id": [-1] * n}
        texts, spans, rows = [], [], []
        for j in range(n):
            try:
                if batch["error"][j]:
                    reason, _, detail = batch["error"][j].partition(": ")
                    raise RowError(reason, detail)
                source = batch["source"][j]
                example = normalize(batch["raw"][j], self.formats[source], self.columns[source])
                check_trainable(example, self.loss_on)
                self.check_no_control_tokens(example)
                out["hash"][j] = example_hash(example)
                out["kind"][j] = example["kind"]
                text, example_spans = self.text_and_spans(example)
            except RowError as exc:
                out["reason"][j], out["detail"][j] = exc.reason, _printable(exc.detail)
                continue
            except Exception as exc:  # a bug of ours must cost one counted row, never the whole run
                out["reason"][j], out["detail"][j] = "unexpected_error", _printable(f"{type(exc).__name__}: {exc}")
                continue
            texts.append(text)
            spans.append(example_spans)
            rows.append(j)
        if not texts:
            return out
        for j, encoded, example_spans in zip(rows, self._encode(texts), spans):
            if isinstance(encoded, RowError):
                out["reason"][j], out["detail"][j] = encoded.reason, _printable(encoded.detail)
                continue
            ids, offsets = encoded
            labels = loss_labels(ids, offsets, example_spans)
            # Position 0 is never a target: nothing precedes it. Counting it would make the loss-token
            # count (and so the loss normalisation) differ from what training can actually predict.
            labels[0] = IGNORE_INDEX
            if len(ids) > self.max_seq_len:
                if self.overlong == "drop":
                    out["reason"][j], out["detail"][j] = "overlong", f"{len(ids)} tokens > max_seq_len {self.max_seq_len}"
                    continue
                ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
            supervised = [t for t in labels if t != IGNORE_INDEX]
            if not supervised:
                out["reason"][j], out["detail"][j] = "no_loss_tokens", f"{len(ids)} tokens, none trained"
                continue
            out["input_ids"][j], out["labels"][j] = list(ids), labels
            out["num_tokens"][j], out["num_loss_tokens"][j] = len(ids), len(supervised)
            out["last_loss_id"][j] = supervised[-1]
        return out


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search: the first index where they differ
    while lo < hi:
        mid = (lo + hi) // 2
        if a[: mid + 1] == b[: mid + 1]:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _snap_before_marker(text: str, pos: int, markers: list[str]) -> int:
    """Move `pos` to the start of a special token it falls inside (`<|im_end|>` vs `<|im_start|>`
    agree on 5 characters; the turn boundary is before either, not inside)."""
    for marker in markers:
        start = text.find(marker, max(0, pos - len(marker) + 1), pos + len(marker) - 1)
        if start != -1 and start < pos < start + len(marker):
            return start
    return pos


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
