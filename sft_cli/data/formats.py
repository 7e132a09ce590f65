"""Raw rows -> one normalised example, or a reason why not.

Five input formats become three example kinds:

    messages / sharegpt / alpaca      -> {"kind": "chat", "messages": [...], "completion_start": 0,
                                          "tools"?: [...], "template_kwargs"?: {...}}
    prompt_completion (strings)       -> {"kind": "prompt_completion", "prompt": str, "completion": str}
    prompt_completion (message lists) -> {"kind": "chat", ..., "completion_start": len(prompt)}
    text                              -> {"kind": "text", "text": str}

Chat messages are the OpenAI / Hugging Face shape, normalised: `role` is one of system, developer,
user, assistant, tool; assistant messages may carry `reasoning_content` (also read from `reasoning`
/ `thinking`, or from a leading `<think>...</think>` in the content) and `tool_calls`
(`[{"type": "function", "function": {"name", "arguments": {...}}}]`, arguments parsed from JSON
text when given as a string, so rows of either shape hash alike); tool messages carry `content`
and, when known, `tool_call_id` / `name`. How a template wants these (arguments as an object or as
text, null or empty content) is decided later, per template (see data/chat.py).

Everything here is pure: `normalize(raw_json, fmt, columns)` either returns an
example or raises `RowError(reason, detail)`; the reasons are the keys of the
rejection report.

    >>> normalize('{"instruction": "Add 2+2", "output": "4"}', "auto", {})["messages"][1]
    {'role': 'assistant', 'content': '4'}
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

ROLE_ALIASES = {
    "system": "system", "developer": "developer", "user": "user", "assistant": "assistant", "tool": "tool",
    "human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    # ShareGPT / Glaive tool data: results arrive as `observation` (or `function`, `ipython`).
    "observation": "tool", "function": "tool", "ipython": "tool",
}
# ShareGPT's `function_call` turn: the assistant calling a tool, its value the call as JSON text.
FUNCTION_CALL_ROLES = ("function_call", "tool_call", "tool_calls")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
# Reasoning written inline before the answer, as reasoning models emit it. The opening tag may be
# missing: R1-style data often starts inside the block because the prompt opened it.
INLINE_THINK = re.compile(r"^\s*(?:<think>)?(.*?)</think>\s*(.*)$", re.DOTALL)


class RowError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def _col(columns: dict[str, str], name: str) -> str:
    return columns.get(name, name)


def detect_format(row: dict, columns: dict[str, str]) -> str:
    def has(*names: str) -> bool:
        return all(_col(columns, n) in row for n in names)

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction", "output"):
        return "alpaca"
    if has("prompt", "completion"):
        return "prompt_completion"
    if has("text"):
        return "text"
    raise RowError("unknown_format", f"columns {sorted(row)[:8]}: expected messages, conversations, "
                   "instruction/output, prompt/completion or text (map yours with data.sources[i].columns)")


def _text(value: Any, what: str) -> str:
    """A message content: a string, or a list of text parts (OpenAI multi-part content)."""
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError("unsupported_content", f"{what}: a '{kind}' part (only text parts are supported)")
        value = "".join(parts)
    if value is None:
        raise RowError("empty_content", f"{what} is null")
    if not isinstance(value, str):
        raise RowError("non_string_content", f"{what} is a {type(value).__name__}")
    if not value.strip():
        raise RowError("empty_content", f"{what} is empty")
    try:  # JSON can spell lone surrogates ("\\ud800"); no tokenizer or Arrow column accepts them
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError("invalid_unicode", f"{what} has a lone surrogate at character {exc.start}") from None
    return value


def _optional_text(row: dict, columns: dict[str, str], name: str) -> str:
    """An optional string field (alpaca `input`, `system`): absent, null or empty mean none; any
    other non-string is an error, never silently dropped."""
    value = row.get(_col(columns, name))
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    return _text(value, name)


def _field(row: dict, columns: dict[str, str], name: str) -> Any:
    key = _col(columns, name)
    if key not in row:
        raise RowError("missing_field", f"no '{key}' field")
    return row[key]


def _json_value(value: Any, what: str, reason: str) -> Any:
    """A field datasets often store as JSON text (tool arguments, tool lists) -> the parsed value."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise RowError(reason, f"{what} is not valid JSON: {value[:60]!r}") from None
    return value


def _tool_calls(calls: Any, what: str) -> list[dict]:
    """OpenAI tool calls (or bare `{"name", "arguments"}` objects) -> the normalised list."""
    calls = _json_value(calls, what, "malformed_tool_call")
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise RowError("malformed_tool_call", f"{what} must be a non-empty list of calls")
    out = []
    for k, call in enumerate(calls):
        where = f"{what}[{k}]"
        if not isinstance(call, dict):
            raise RowError("malformed_tool_call", f"{where} is not an object")
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
            raise RowError("malformed_tool_call", f"{where} has no function name")
        arguments = function.get("arguments", function.get("parameters", {}))
        arguments = {} if arguments is None or arguments == "" else _json_value(arguments, f"{where}.arguments",
                                                                                "malformed_tool_arguments")
        if not isinstance(arguments, dict):
            raise RowError("malformed_tool_arguments", f"{where}.arguments is a {type(arguments).__name__}, "
                           "not an object of named arguments")
        normalised = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str) and call["id"]:
            normalised = {"id": call["id"], **normalised}
        out.append(normalised)
    return out


def tools_list(value: Any, what: str = "tools") -> list[dict] | None:
    """A row's tool schemas (a list, or JSON text of one) as `{"type": "function", "function": {...}}`."""
    value = _json_value(value, what, "malformed_tools")
    if value is None or value == []:
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError("malformed_tools", f"{what} must be a list of function schemas")
    out = []
    for k, tool in enumerate(value):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            spec = tool["function"]
        elif isinstance(tool, dict):  # a bare {"name", "description", "parameters"}
            spec = tool
        else:
            raise RowError("malformed_tools", f"{what}[{k}] is not an object")
        if not isinstance(spec.get("name"), str) or not spec["name"].strip():
            raise RowError("malformed_tools", f"{what}[{k}] has no name")
        out.append({"type": "function", "function": spec})
    return out


def _reasoning(message: dict, what: str) -> str | None:
    for key in REASONING_KEYS:
        value = message.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        return _text(value, f"{what}.{key}").strip()
    return None


def _assistant(message: dict, content_key: str, what: str) -> dict:
    """An assistant message: content, and optionally reasoning and tool calls (then content may be empty)."""
    calls = message.get("tool_calls")
    calls = _tool_calls(calls, f"{what}.tool_calls") if calls not in (None, [], "") else None
    raw = message.get(content_key)
    if calls and (raw is None or (isinstance(raw, str) and not raw.strip()) or raw == []):
        content = None
    else:
        content = _text(raw, f"{what}.{content_key}")
    reasoning = _reasoning(message, what)
    if reasoning is None and content is not None and "</think>" in content:
        match = INLINE_THINK.match(content)
        if match and match.group(1).strip():
            reasoning, content = match.group(1).strip(), match.group(2)
            if not content.strip() and not calls:
                raise RowError("empty_content", f"{what}: only reasoning, no answer after </think>")
            content = content if content.strip() else None
    out: dict = {"role": "assistant", "content": content}
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = calls
    return out


def _tool_result(message: dict, content_key: str, what: str) -> dict:
    """A tool message: its result as text (JSON results are dumped; an empty result is a result)."""
    value = message.get(content_key)
    if isinstance(value, (dict, list)) and not (isinstance(value, list) and all(isinstance(p, dict) and "text" in p
                                                                                for p in value)):
        value = json.dumps(value, ensure_ascii=False)
    content = "" if value == "" else _text(value, f"{what}.{content_key}")
    out = {"role": "tool", "content": content}
    for key in ("tool_call_id", "name"):
        if isinstance(message.get(key), str) and message[key]:
            out[key] = message[key]
    return out


def _function_call_turn(value: Any, what: str) -> dict:
    """ShareGPT `function_call`: the value is the call (or calls) as JSON text."""
    return {"role": "assistant", "content": None, "tool_calls": _tool_calls(value, what)}


def _name_tool_results(messages: list[dict]) -> None:
    """Give tool results the name of the call they answer (templates print it), by id or by order."""
    pending: list[dict] = []
    for message in messages:
        if message["role"] == "assistant":
            pending = list(message.get("tool_calls") or [])
        elif message["role"] == "tool" and "name" not in message and pending:
            match = next((c for c in pending if message.get("tool_call_id") and c.get("id") == message["tool_call_id"]),
                         pending[0])
            pending.remove(match)
            message["name"] = match["function"]["name"]


def _messages(items: Any, role_key: str, content_key: str, what: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise RowError("missing_field", f"{what} must be a non-empty list")
    # LIMA style: a bare list of strings, alternating user / assistant.
    if all(isinstance(m, str) for m in items):
        return [{"role": ("user", "assistant")[i % 2], "content": _text(m, f"{what}[{i}]")}
                for i, m in enumerate(items)]
    out: list[dict] = []
    for i, message in enumerate(items):
        where = f"{what}[{i}]"
        if not isinstance(message, dict):
            raise RowError("missing_field", f"{where} is not an object")
        if role_key not in message:
            raise RowError("missing_field", f"{where} has no '{role_key}'")
        raw_role = str(message[role_key]).lower() if message[role_key] is not None else None
        if raw_role in FUNCTION_CALL_ROLES:
            call = _function_call_turn(message.get(content_key), f"{where}.{content_key}")
            if out and out[-1]["role"] == "assistant" and not out[-1].get("tool_calls"):
                out[-1]["tool_calls"] = call["tool_calls"]  # "I'll look that up" + the call: one turn
            else:
                out.append(call)
            continue
        role = ROLE_ALIASES.get(raw_role) if raw_role is not None else None
        if role is None:
            raise RowError("unknown_role", f"{where} role '{message[role_key]}' "
                           "(use system, developer, user, assistant or tool)")
        if role == "assistant":
            out.append(_assistant(message, content_key, where))
            continue
        if content_key not in message:
            raise RowError("missing_field", f"{where} has no '{content_key}'")
        if role == "tool":
            out.append(_tool_result(message, content_key, where))
        else:
            out.append({"role": role, "content": _text(message[content_key], f"{where}.{content_key}")})
    _name_tool_results(out)
    return out


def _row_extras(row: dict, columns: dict[str, str]) -> dict:
    """Row-level `tools` and `chat_template_kwargs`, only when present (plain chats hash as before)."""
    extras = {}
    tools = tools_list(row.get(_col(columns, "tools")))
    if tools:
        extras["tools"] = tools
    kwargs = _json_value(row.get(_col(columns, "chat_template_kwargs")), "chat_template_kwargs",
                         "malformed_chat_template_kwargs")
    if kwargs:
        if not isinstance(kwargs, dict):
            raise RowError("malformed_chat_template_kwargs", "chat_template_kwargs must be an object")
        extras["template_kwargs"] = kwargs
    return extras


def _chat(row: dict, fmt: str, columns: dict[str, str]) -> dict:
    role_key, content_key = _col(columns, "role"), _col(columns, "content")
    if fmt == "messages":
        messages = _messages(_field(row, columns, "messages"), role_key, content_key, "messages")
    elif fmt == "sharegpt":
        messages = _messages(_field(row, columns, "conversations"), _col(columns, "from"), _col(columns, "value"),
                             "conversations")
        if _col(columns, "system") in row and messages[0]["role"] != "system":  # ShareGPT's system column
            system = _optional_text(row, columns, "system")
            if system:
                messages.insert(0, {"role": "system", "content": system})
    else:  # alpaca
        instruction = _text(_field(row, columns, "instruction"), "instruction")
        extra = _optional_text(row, columns, "input")
        user = instruction + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text(_field(row, columns, "output"), "output")}]
        system = _optional_text(row, columns, "system")
        if system:
            messages.insert(0, {"role": "system", "content": system})
    return {"kind": "chat", "messages": messages, "completion_start": 0, **_row_extras(row, columns)}


def _prompt_completion(row: dict, columns: dict[str, str]) -> dict:
    prompt, completion = _field(row, columns, "prompt"), _field(row, columns, "completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        # Conversational prompt/completion: the chat template applies, loss on the completion turns.
        prompt_msgs = _messages(prompt, "role", "content", "prompt") if isinstance(prompt, list) \
            else [{"role": "user", "content": _text(prompt, "prompt")}]
        completion_msgs = _messages(completion, "role", "content", "completion") if isinstance(completion, list) \
            else [{"role": "assistant", "content": _text(completion, "completion")}]
        return {"kind": "chat", "messages": prompt_msgs + completion_msgs, "completion_start": len(prompt_msgs),
                **_row_extras(row, columns)}
    return {"kind": "prompt_completion", "prompt": _text(prompt, "prompt"), "completion": _text(completion, "completion")}


def normalize(raw: str, fmt: str, columns: dict[str, str]) -> dict:
    """Parse one raw JSON row into an example (see module docstring) or raise RowError."""
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RowError("malformed_json", f"{exc.msg} at column {exc.colno}") from None
    except RecursionError:  # [[[[...]]]] deeper than the parser's stack
        raise RowError("malformed_json", "nested too deeply") from None
    if not isinstance(row, dict):
        raise RowError("malformed_json", f"a row must be a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = detect_format(row, columns)
    if fmt in ("messages", "sharegpt", "alpaca"):
        return _chat(row, fmt, columns)
    if fmt == "prompt_completion":
        return _prompt_completion(row, columns)
    if fmt == "text":
        return {"kind": "text", "text": _text(_field(row, columns, "text"), "text")}
    raise RowError("unknown_format", f"format '{fmt}'")


def check_trainable(example: dict, loss_on: str) -> None:
    """Reject chats that cannot be trained under `loss_on` (no reply to learn, or a dangling prompt)."""
    if example["kind"] != "chat":
        return
    roles = [m["role"] for m in example["messages"]]
    if "assistant" not in roles[example["completion_start"]:]:
        raise RowError("no_assistant_turn", f"roles {roles}")
    if loss_on != "all" and roles[-1] != "assistant":
        raise RowError("not_ending_with_assistant", f"last role is '{roles[-1]}' (loss_on={loss_on})")


def example_hash(example: dict) -> int:
    """Stable 63-bit hash of the normalised example: duplicates across formats hash alike."""
    blob = json.dumps(example, sort_keys=True, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1
