"""Conversations -> training examples whose trained text is exactly what the model generates.

Any Hugging Face chat template, read through its own renderer (`render_jinja_template`, the
code behind `apply_chat_template`; a row's renders share its compiled template and one template-safe
copy of the row, see `row_renderer`), with tool calls, tool results, tool schemas and reasoning.
For each trained assistant turn i:

    prompt_i = template(messages[:i], add_generation_prompt=True)   # what inference feeds the model
    own_i    = template(messages[:i+1])                              # the turn rendered as the live one

The turn is trained on `own_i[len(prompt_i):]` up to and including the token that ends it. It is
trained inside the whole conversation when the template renders it there the same way (most
templates, most turns); templates that rewrite history (Qwen3, GLM, gpt-oss, Gemma 4 drop the
reasoning of turns before the last user message) render old turns unlike the live ones, so such a
turn gets its own example, `own_i` (`data.reasoning_turns=all`), or is left untrained (`last`).
No turn is trained twice.

Templates that open the reply in the prompt (`<think>\\n` at the end of the generation prompt) get
the reasoning filled into that block; a turn without reasoning gets an empty block, counted. Where
the template renders reasoning itself, the empty block is its own (rendered with a sentinel that
is then removed); where it never does (R1 distills), `<think>\\n` + reasoning + `\\n</think>\\n\\n`
follows the prompt, the format those models emit.

A turn ends at its end token: the first special token after it (`<|im_end|>`, `<|eot_id|>`,
`<|end|>`; gpt-oss closes a last turn with `<|return|>`); a template-wide suffix after the last
turn (Phi-3's EOS) is not part of any turn. Templates with no end token (GLM: the next role marker
stops generation) get the marker the model emits to stop, learned from the template itself.

Every trained turn is checked to hold all of its data (content, reasoning, each tool call's name and
arguments) and every conversation its tool schemas and tool results; a template that cannot express
them rejects the row with a reason (`template_drops_tools`, ...), never keeps it silently short.

    chat = ChatRenderer(tokenizer.chat_template, tokenizer.special_tokens_map, specials, loss_on="assistant")
    examples, stats = chat.examples({"kind": "chat", "messages": [...], "completion_start": 0})
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sft_cli.data.formats import RowError

# Written where reasoning goes, then removed: finds the empty think block a template would render.
SENTINEL = "Zq7SentinelReasoning"
# A generation prompt that ends inside an opened reasoning block.
OPENER = re.compile(r"<(think|thinking|thought|reasoning)>\s*$")
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Stop tokens a template may use besides the ones its renderings show (tool-use variants).
KNOWN_STOP_TOKENS = ("<|eom_id|>", "<|eot_id|>", "<|return|>", "<|call|>", "<|im_end|>", "<end_of_turn>",
                     "<|end_of_text|>", "<turn|>", "<|observation|>", "<|user|>")


@dataclass
class Example:
    """One training text cut from a conversation, with the [start, end) character spans that train."""

    text: str
    spans: list[tuple[int, int]]
    turns: list[int]  # message indices trained here
    own: bool = False  # a turn's own example (its reasoning is dropped from the full conversation)
    tool_call_spans: list[int] = field(default_factory=list)  # indices into spans of tool-calling turns


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
    """Move `pos` to the start of a marker it falls inside (`<|im_end|>` vs `<|im_start|>` agree on
    5 characters; the turn boundary is before either, not inside)."""
    for marker in markers:
        start = text.find(marker, max(0, pos - len(marker) + 1), pos + len(marker) - 1)
        if start != -1 and start < pos < start + len(marker):
            return start
    return pos


def _variants(text: str) -> Iterator[str]:
    """How a template may print a string: as is, JSON-escaped (tojson), or Python-escaped (repr);
    lazily, since the first is almost always the one."""
    text = text.strip()
    yield text
    yield from dict.fromkeys([json.dumps(text, ensure_ascii=False)[1:-1], json.dumps(text)[1:-1],
                              repr(text)[1:-1]])


def _appears(value: Any, text: str) -> bool:
    if isinstance(value, str):
        return not value.strip() or any(v in text for v in _variants(value))
    if isinstance(value, bool):
        return any(v in text for v in (str(value).lower(), str(value)))
    if value is None:
        return any(v in text for v in ("null", "None", "none"))
    if isinstance(value, (int, float)):
        return any(v in text for v in {str(value), json.dumps(value), repr(value)})
    if isinstance(value, dict):
        return all(_appears(k, text) and _appears(v, text) for k, v in value.items())
    if isinstance(value, list):
        return all(_appears(v, text) for v in value)
    return True


def _call_id(message: int, call: int) -> str:
    """A deterministic 9-character call id, for templates that require one (Mistral)."""
    return f"c{message:04d}{call:04d}"[-9:]


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


class ChatRenderer:
    """Renders chats with one template and cuts them into examples (see module docstring)."""

    def __init__(self, template: str, template_vars: dict, specials: list[str], markers: list[str] | None = None,
                 loss_on: str = "assistant", reasoning_turns: str = "all", reasoning_format: str = "inline",
                 template_kwargs: dict | None = None):
        self.template = template
        self.template_vars = dict(template_vars)  # special tokens by name, as apply_chat_template passes them
        self.specials = sorted(set(specials), key=len, reverse=True)  # longest first
        self.markers = sorted(set(markers or specials), key=len, reverse=True)
        self.loss_on = loss_on
        self.reasoning_turns = reasoning_turns
        self.reasoning_format = reasoning_format
        self.template_kwargs = dict(template_kwargs or {})
        self.uses_generation_blocks = bool(GENERATION_BLOCK.search(template))
        self._profile: dict | None = None

    # -- rendering ---------------------------------------------------------------------------
    def _render(self, messages: list[dict], add_generation_prompt: bool = False, tools=None, kwargs=None,
                return_indices: bool = False):
        from transformers.utils.chat_template_utils import render_jinja_template

        # As apply_chat_template does: a key set to None is a key not given (`content: null` on a
        # tool-calling turn reaches the template as no content at all).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        rendered, indices = render_jinja_template(
            conversations=[messages], tools=tools, chat_template=self.template,
            add_generation_prompt=add_generation_prompt, return_assistant_tokens_mask=return_indices,
            **{**self.template_vars, **self.template_kwargs, **(kwargs or {})})
        return (rendered[0], indices[0]) if return_indices else rendered[0]

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools=None, kwargs=None,
               return_indices: bool = False):
        """The template's text, or RowError(template_error) with the template's own message."""
        try:
            return self._render(messages, add_generation_prompt, tools, kwargs, return_indices)
        except Exception as exc:  # the template's raise_exception, or a jinja error on this data
            raise _template_error(exc) from None

    def row_renderer(self, messages: list[dict], tools=None, kwargs=None) -> Callable[..., str]:
        """`render` for lists of one row's messages (prefixes of `messages`, or them plus a changed
        last turn), with render_jinja_template's own steps: the compiled template, each message and
        the tools made template-safe by its helpers, but once per row rather than once per render
        (a row renders up to 2k+1 prefixes of itself)."""
        try:
            from transformers.utils.chat_template_utils import (
                _alias_reasoning_fields,
                _compile_jinja_template,
                _plain_template_data,
            )
        except ImportError:  # an older transformers: every render goes through render_jinja_template
            return lambda upto, add_generation_prompt=False: self.render(upto, add_generation_prompt, tools, kwargs)
        template = _compile_jinja_template(self.template)
        variables = _plain_template_data({**self.template_vars, **self.template_kwargs, **(kwargs or {})})
        tool_schemas = _plain_template_data(tools)

        def safe(message: dict) -> dict:
            # As apply_chat_template does: a key set to None is a key not given.
            return _alias_reasoning_fields(_plain_template_data([{k: v for k, v in message.items()
                                                                  if v is not None}]))[0]

        # Keyed by identity: the row's messages stay alive while it renders, so no id is reused.
        ready = {id(m): safe(m) for m in messages}

        def render(upto: list[dict], add_generation_prompt: bool = False) -> str:
            chat = [ready[id(m)] if id(m) in ready else safe(m) for m in upto]
            try:
                return template.render(messages=chat, tools=tool_schemas, documents=None,
                                       add_generation_prompt=add_generation_prompt, **variables)
            except Exception as exc:
                raise _template_error(exc) from None

        return render

    def _try(self, messages: list[dict], *args, **kwargs) -> str | None:
        if self._profile is not None and self._profile["parts"]:
            messages = [_as_parts(m) for m in messages]
        try:
            return self._render(messages, *args, **kwargs)
        except Exception:
            return None

    # -- what the template can express: probed once, on made-up data -------------------------
    @property
    def profile(self) -> dict:
        if self._profile is None:
            self._profile = self._probe()
        return self._profile

    def _probe(self) -> dict:
        user, user2 = {"role": "user", "content": "zqU1"}, {"role": "user", "content": "zqU2"}
        tools = [{"type": "function", "function": {"name": "zq_fn", "description": "zq tool",
                                                     "parameters": {"type": "object", "properties": {
                                                         "zq_key": {"type": "string"}}}}}]
        profile: dict[str, Any] = {"parts": False, "args": None, "null_content": None, "ids": False,
                                   "native_reasoning": False,
                                   "opener": None, "developer": "developer" in self.template, "end_suffix": "",
                                   "stop": None, "tool_stop": None}
        # Multimodal templates iterate content parts and drop (or fail on) a plain string.
        plain = self._try([user, {"role": "assistant", "content": "zqA"}])
        if not (plain and "zqA" in plain):
            parts = self._try([{"role": "user", "content": [{"type": "text", "text": "zqU1"}]},
                               {"role": "assistant", "content": [{"type": "text", "text": "zqA"}]}])
            profile["parts"] = bool(parts and "zqA" in parts)
            if profile["parts"]:
                self._profile = profile  # the probes below render through the parts conversion
        # Tool-call arguments: an object (most templates `tojson` it) or JSON text (DeepSeek prints it);
        # an object printed as a Python dict ("{'zq_key'") means the template wanted text.
        # Some (Mistral) refuse calls without 9-character ids: then calls get ids where the data has none.
        for ids, args, null_content in itertools.product((False, True), ({"zq_key": "zq_val"}, '{"zq_key": "zq_val"}'),
                                                         (None, "")):
            call = {"role": "assistant", "content": null_content, "tool_calls": [_call("zq_fn", args)]}
            result = {"role": "tool", "content": "zqT", "name": "zq_fn"}
            if ids:
                call["tool_calls"][0]["id"] = result["tool_call_id"] = _call_id(0, 0)
            text = self._try([user, call, result, {"role": "assistant", "content": "zqA"}], tools=tools)
            if text and "zq_fn" in text and "zq_val" in text and "{'zq_key'" not in text and "zqA" in text:
                profile.update(args="object" if isinstance(args, dict) else "text", null_content=null_content,
                               ids=ids)
                break
        live = self._try([user, {"role": "assistant", "content": "zqA", "reasoning_content": "zqR"}])
        profile["native_reasoning"] = bool(live and "zqR" in live)
        prompt = self._try([user], add_generation_prompt=True) or ""
        opener = OPENER.search(prompt)
        profile["opener"] = opener.group(0) if opener else None
        # How a last turn closes vs a turn that goes on: Phi-3 appends EOS after the last turn's
        # <|end|> (a conversation suffix, not part of the turn); GLM closes no turn (the model stops
        # by emitting the next role marker, which is then its stop token).
        last = self._try([user, {"role": "assistant", "content": "zqA"}])
        going_on = self._try([user, {"role": "assistant", "content": "zqA"}, user2,
                              {"role": "assistant", "content": "zqB"}])
        if last and going_on and "zqA" in last:
            at = last.index("zqA") + 3
            tail, next_stop = last[at:].strip(), self._special_at(going_on, at)
            if next_stop and tail.startswith(next_stop[2]) and tail != next_stop[2]:
                profile["end_suffix"] = tail[len(next_stop[2]):]
            if not tail and next_stop:
                profile["stop"] = next_stop[2]
        if profile["args"]:
            args = {"zq_key": "zq_val"} if profile["args"] == "object" else '{"zq_key": "zq_val"}'
            call = {"role": "assistant", "content": profile["null_content"], "tool_calls": [
                {"id": _call_id(0, 0), **_call("zq_fn", args)}]}
            result = {"role": "tool", "content": "zqT", "name": "zq_fn", "tool_call_id": _call_id(0, 0)}
            alone = self._try([user, call], tools=tools)
            answered = self._try([user, call, result], tools=tools)
            if alone and answered:
                at = _common_prefix_len(alone, answered)
                if not alone[at:].strip() and not self._ends_special(alone.rstrip()):
                    found = self._special_at(answered, at)
                    profile["tool_stop"] = found[2] if found else None
        return profile

    # -- special tokens ----------------------------------------------------------------------
    def _ends_special(self, text: str) -> bool:
        return text.endswith(tuple(self.specials))

    def _special_at(self, text: str, pos: int) -> tuple[int, int, str] | None:
        """(start, end, token) of a special token at `pos`, after whitespace only."""
        start = len(text) - len(text[pos:].lstrip()) if text[pos:].strip() else None
        if start is None:
            return None
        for token in self.specials:
            if text.startswith(token, start):
                return start, start + len(token), token
        return None

    def stop_tokens(self) -> list[str]:
        """Tokens that end a generated turn for this template (for generation configs)."""
        found = {t for t in (self.profile["stop"], self.profile["tool_stop"]) if t}
        found |= {t for t in KNOWN_STOP_TOKENS if t in self.template and t in self.specials}
        return sorted(found)

    # -- messages as this template wants them --------------------------------------------------
    def for_template(self, messages: list[dict], stats: Counter) -> list[dict]:
        profile, out = self.profile, []
        keeps_reasoning = profile["native_reasoning"] or profile["opener"] is not None
        pending: list[str] = []  # ids of the calls still waiting for their results
        for index, message in enumerate(messages):
            message = dict(message)
            if profile["ids"] and message.get("tool_calls"):
                message["tool_calls"] = [c if isinstance(c.get("id"), str) and len(c["id"]) == 9
                                         else {**c, "id": _call_id(index, k)} for k, c in enumerate(message["tool_calls"])]
                pending = [c["id"] for c in message["tool_calls"]]
            elif profile["ids"] and message["role"] == "tool" and pending:
                wanted = message.get("tool_call_id")
                message["tool_call_id"] = wanted if wanted in pending else pending[0]
                pending.remove(message["tool_call_id"])
            if message["role"] == "developer" and not profile["developer"]:
                message["role"] = "system"  # templates without a developer role read it as the system prompt
            if message["role"] == "assistant":
                if message.get("tool_calls"):
                    if profile["args"] == "text":
                        message["tool_calls"] = [
                            {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"],
                                                                                          ensure_ascii=False)}}
                            for c in message["tool_calls"]]
                    if message.get("content") is None:
                        message["content"] = profile["null_content"]
                elif message.get("content") is None:
                    message["content"] = ""
                reasoning = message.get("reasoning_content")
                if reasoning is not None and not keeps_reasoning:
                    del message["reasoning_content"]
                    if self.reasoning_format == "inline":  # how models without a reasoning slot learn to reason
                        message["content"] = f"<think>\n{reasoning}\n</think>\n\n{message.get('content') or ''}"
                        stats["reasoning_inlined"] += 1
                    else:
                        stats["reasoning_dropped"] += 1
            if profile["parts"]:
                message = _as_parts(message)
            out.append(message)
        return out

    # -- the examples of one conversation -----------------------------------------------------
    def examples(self, example: dict) -> tuple[list[Example], Counter]:
        stats: Counter = Counter()
        source = example["messages"]
        messages = self.for_template(source, stats)
        tools = example.get("tools")
        kwargs = example.get("template_kwargs")
        if tools:
            stats["rows_with_tools"] += 1

        render = self.row_renderer(messages, tools, kwargs)
        if self.uses_generation_blocks:
            full, indices = self.render(messages, False, tools, kwargs, return_indices=True)
        else:
            full = render(messages)
        self._check_context(example, full)
        if self.loss_on == "all":
            return [Example(full, [(0, len(full))], [])], stats
        if self.uses_generation_blocks:
            # The template's markers decide what trains; reasoning it leaves out is counted, not hidden.
            stats["reasoning_dropped"] += sum(1 for m in source if m.get("reasoning_content")
                                              and not _appears(m["reasoning_content"], full))
            spans = [tuple(span) for span in indices]
            return [Example(full, spans[-1:] if self.loss_on == "last_assistant" else spans, [])], stats

        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= example["completion_start"]]
        if self.loss_on == "last_assistant":
            turns = turns[-1:]
        last_message = len(messages) - 1
        main = Example(full, [], [])
        owns: list[Example] = []
        for i in turns:
            prompt = render(messages[:i], add_generation_prompt=True)
            if i == last_message:
                # The conversation's last turn: rendered live in `full` itself (filled or closed as needed).
                text, span, dropped = self._own(messages, i, prompt, full, render, stats)
                self._check_turn(source[i], text[span[0]:span[1]], i, dropped)
                if all(end <= _common_prefix_len(text, full) for _, end in main.spans):
                    main.text = text  # earlier turns sit in the shared prefix
                    self._train(stats, main, span, source[i], i, dropped)
                else:
                    owns.append(self._train(stats, Example(text, [], [], own=True), span, source[i], i, dropped))
                continue
            live = render(messages[: i + 1])
            if live.startswith(prompt) and full.startswith(live):
                # The common case: the turn renders in the conversation exactly as it renders live.
                end = self._close_within(full, len(prompt), len(live))
                if end is not None:
                    self._check_turn(source[i], full[len(prompt):end], i)
                    self._train(stats, main, (len(prompt), end), source[i], i)
                    continue
            text, span, dropped = self._own(messages, i, prompt, live, render, stats)
            trained = text[span[0]:span[1]]
            self._check_turn(source[i], trained, i, dropped)
            in_full = self._close_within(full, len(prompt), _common_prefix_len(live, full)) \
                if full.startswith(prompt) else None
            if in_full is not None and _body(full[len(prompt):in_full], self.specials) == _body(trained, self.specials):
                self._train(stats, main, (len(prompt), in_full), source[i], i)  # only the end token differs (gpt-oss)
            elif self.reasoning_turns == "all":
                # History renders this turn unlike the live one: train it where it is live.
                owns.append(self._train(stats, Example(text, [], [], own=True), span, source[i], i, dropped))
            else:
                stats["turns_untrained"] += 1
        examples = sorted(([main] if main.spans else []) + owns, key=lambda e: e.turns[0])  # in turn order
        if not examples:
            raise RowError("template_mismatch", "no assistant turn renders as it would be generated")
        stats["turn_examples"] += len(owns)
        return examples, stats

    def _train(self, stats: Counter, example: Example, span: tuple[int, int], message: dict, i: int,
               reasoning_dropped: bool = False) -> Example:
        """Turn i (`message`, as the user wrote it) trains on `span` of `example`; counted."""
        example.spans.append(span)
        example.turns.append(i)
        stats["turns_trained"] += 1
        if message.get("tool_calls"):
            stats["tool_calls_trained"] += len(message["tool_calls"])
            example.tool_call_spans.append(len(example.spans) - 1)
        if message.get("reasoning_content") and self._keeps_reasoning() and not reasoning_dropped:
            stats["reasoning_turns_trained"] += 1
        return example

    def _keeps_reasoning(self) -> bool:
        profile = self.profile
        return bool(profile["native_reasoning"] or profile["opener"] or self.reasoning_format == "inline")

    def _own(self, messages: list[dict], i: int, prompt: str, live: str, render,
             stats: Counter) -> tuple[str, tuple[int, int], bool]:
        """Turn i rendered as the live turn: (prompt + what the model generates, the trained span,
        whether data.reasoning_format=drop took its reasoning out)."""
        message = messages[i]
        text, dropped = live, False
        if not live.startswith(prompt):
            profile = self.profile
            if profile["native_reasoning"] and not message.get("reasoning_content"):
                # Always-thinking templates: the model opens a think block even with nothing to think;
                # the template's own empty block is what it generates.
                probe = render(messages[:i] + [{**message, "reasoning_content": SENTINEL}])
                if probe.startswith(prompt) and SENTINEL in probe:
                    text = probe.replace(SENTINEL, "")
                    stats["empty_think_filled"] += 1
            opener = profile["opener"]
            if text is live and opener and prompt.endswith(opener):
                # The prompt opens the think block and the template never renders one (R1 distills):
                # the reply continues it, in the format these models emit.
                cut = len(prompt) - len(opener)
                tag = OPENER.search(opener).group(1)
                if live[:cut] == prompt[:cut] and not live[cut:].lstrip().startswith(f"<{tag}>"):
                    reasoning = message.get("reasoning_content") or ""
                    if not reasoning:
                        stats["empty_think_filled"] += 1
                    text = live[:cut] + opener + reasoning + (f"\n</{tag}>\n\n") + live[cut:]
            if not text.startswith(prompt) and message.get("reasoning_content"):
                # A prompt that closes the think block itself (non-thinking mode) has no room for reasoning.
                bare = render(messages[:i] + [{k: v for k, v in message.items() if k != "reasoning_content"}])
                if bare.startswith(prompt):
                    if self.reasoning_format != "drop":
                        raise RowError("template_drops_reasoning", f"turn {i}: the inference prompt leaves no room "
                                       "for reasoning (a non-thinking mode?); set data.chat_template_kwargs (e.g. "
                                       "enable_thinking: true) or data.reasoning_format=drop")
                    text, dropped = bare, True
                    stats["reasoning_dropped"] += 1
            if not text.startswith(prompt):
                at = _common_prefix_len(prompt, live)
                raise RowError("template_mismatch", f"turn {i}: the inference prompt continues with "
                               f"{prompt[at:at + 24]!r} but the rendered turn with {live[at:at + 24]!r}")
        end, text = self._close_last(text, len(prompt), bool(message.get("tool_calls")))
        return text, (len(prompt), end), dropped

    def _close_within(self, text: str, start: int, boundary: int) -> int | None:
        """End of a turn that the conversation goes on after: its own special token at `boundary`
        (where the rendering that ends here and the one that goes on part ways) or right after it."""
        boundary = _snap_before_marker(text, boundary, self.markers)
        end = start + len(text[start:boundary].rstrip())
        if end <= start:
            return None
        if self._ends_special(text[:end]):
            return end
        found = self._special_at(text, boundary)  # gpt-oss <|end|>, GLM's next role marker
        return found[1] if found else end

    def _close_last(self, text: str, start: int, has_calls: bool) -> tuple[int, str]:
        """End of the last turn of `text` (and the text, when the stop marker must be appended)."""
        body = text.rstrip()
        suffix = self.profile["end_suffix"].strip()
        if suffix and body.endswith(suffix) and self._ends_special(body[: -len(suffix)].rstrip()):
            body = body[: -len(suffix)].rstrip()  # Phi-3's EOS after <|end|>: the conversation's, not the turn's
        if not self._ends_special(body):
            stop = self.profile["tool_stop"] if has_calls else self.profile["stop"]
            if stop:  # GLM: the model ends its turn by writing the next role marker
                return len(body) + len(stop), body + stop + text[len(body):]
        return len(body), text

    # -- every piece of data must reach the text ---------------------------------------------
    def _check_turn(self, message: dict, trained: str, i: int, reasoning_dropped: bool = False) -> None:
        content = message.get("content")
        if content and not _appears(content, trained):
            raise RowError("template_drops_content", f"turn {i}: the trained text lacks the turn's content")
        reasoning = message.get("reasoning_content")
        if reasoning and self._keeps_reasoning() and not reasoning_dropped and not _appears(reasoning, trained):
            raise RowError("template_drops_reasoning", f"turn {i}: the template does not render its reasoning "
                           "(data.reasoning_format=drop trains the answer only)")
        for call in message.get("tool_calls") or []:
            function = call["function"]
            if function["name"] not in trained or not _appears(function["arguments"], trained):
                raise RowError("template_drops_tool_calls", f"turn {i}: the template does not render tool call "
                               f"{function['name']!r} with its arguments")

    def _check_context(self, example: dict, full: str) -> None:
        for tool in example.get("tools") or []:
            if tool["function"]["name"] not in full:
                raise RowError("template_drops_tools", f"the template does not render the tool schema "
                               f"{tool['function']['name']!r} (it takes no `tools`)")
        for i, message in enumerate(example["messages"]):
            if message["role"] == "tool" and not _appears(message["content"], full):
                raise RowError("template_drops_tool_results", f"messages[{i}]: the template does not render this "
                               "tool result")


def _template_error(exc: Exception) -> RowError:
    """A template's failure on a row (its raise_exception, or a jinja error on this data) as a rejection."""
    return RowError("template_error", (str(exc).splitlines() or [type(exc).__name__])[0][:200])


def _as_parts(message: dict) -> dict:
    content = message.get("content")
    return {**message, "content": [{"type": "text", "text": content}]} if isinstance(content, str) else message


def _body(text: str, specials: list[str]) -> str:
    """A turn's text without its end token: gpt-oss closes the same turn with <|end|> in history
    and <|return|> when it is the last one."""
    text = text.rstrip()
    for token in specials:
        if text.endswith(token):
            return text[: -len(token)].rstrip()
    return text
