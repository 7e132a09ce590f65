"""Examples -> (input_ids, labels): the chat template and the loss mask.

The mask comes from the rendered text, so it works with any Hugging Face chat
template, with or without `{% generation %}` markers. For each assistant turn i:

    prompt_i = template(messages[:i], add_generation_prompt=True)   # what inference sees
    upto_i   = template(messages[:i+1])
    full     = template(messages)

`full` must start with `prompt_i` and with `upto_i` (else the template renders
history differently from a live prompt, and training on it would teach the wrong
thing: the row is rejected as `template_mismatch`). The turn's loss span is
`upto_i[len(prompt_i):]` with trailing whitespace cut: the reply plus the tokens
that close it (`<|im_end|>`, `<|eot_id|>`, `</s>`), so the model learns to stop.
Characters map to tokens through the fast tokenizer's offsets; a token is trained
when it overlaps a span.

    ChatML:  <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
    loss:                                                        ^^^^^^^^^^^^^^^^
"""

from __future__ import annotations

import numpy as np

from sft_cli.data.formats import RowError, check_trainable, example_hash, normalize

IGNORE_INDEX = -100


def _compile(template: str):
    try:  # transformers' own compiled environment: same globals (raise_exception, strftime_now, ...)
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template)
    except ImportError:  # pragma: no cover - older/newer transformers
        import jinja2

        return jinja2.Environment().from_string(template)


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
        self._compiled = None

    def __getstate__(self):  # compiled jinja does not pickle; each worker compiles its own
        return {**self.__dict__, "_compiled": None}

    # -- text and character spans ------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        template = self.tokenizer.chat_template
        if not template:
            raise RowError("no_chat_template")
        if self._compiled is None:
            self._compiled = _compile(template)
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.template_vars)
        except Exception as exc:  # the template's own raise_exception, or a jinja error
            raise RowError("template_error", str(exc).splitlines()[0][:200]) from None

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
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = full if i == len(messages) - 1 else self.render(messages[: i + 1], add_generation_prompt=False)
            if not (full.startswith(prompt) and full.startswith(upto) and len(upto) > len(prompt)):
                raise RowError("template_mismatch",
                               f"turn {i}: the prompt rendered alone is not a prefix of the rendered conversation")
            reply = upto[len(prompt):]
            spans.append((len(prompt), len(prompt) + len(reply.rstrip())))
        return full, spans

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
                out["hash"][j] = example_hash(example)
                out["kind"][j] = example["kind"]
                text, example_spans = self.text_and_spans(example)
            except RowError as exc:
                out["reason"][j], out["detail"][j] = exc.reason, exc.detail
                continue
            texts.append(text)
            spans.append(example_spans)
            rows.append(j)
        if not texts:
            return out
        # One batched call into the Rust tokenizer. add_special_tokens=False: the template (or
        # bos_text above) already wrote BOS, so it is never doubled.
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                                 return_attention_mask=False)
        for j, ids, offsets, example_spans in zip(rows, encoded["input_ids"], encoded["offset_mapping"], spans):
            labels = loss_labels(ids, offsets, example_spans)
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
