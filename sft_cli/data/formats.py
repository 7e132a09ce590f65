"""Raw rows -> one normalised example, or a reason why not.

Five input formats become three example kinds:

    messages / sharegpt / alpaca      -> {"kind": "chat", "messages": [{"role", "content"}], "completion_start": 0}
    prompt_completion (strings)       -> {"kind": "prompt_completion", "prompt": str, "completion": str}
    prompt_completion (message lists) -> {"kind": "chat", ..., "completion_start": len(prompt)}
    text                              -> {"kind": "text", "text": str}

Everything here is pure: `normalize(raw_json, fmt, columns)` either returns an
example or raises `RowError(reason, detail)`; the reasons are the keys of the
rejection report.

    >>> normalize('{"instruction": "Add 2+2", "output": "4"}', "auto", {})["messages"][1]
    {'role': 'assistant', 'content': '4'}
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

ROLE_ALIASES = {
    "system": "system", "user": "user", "assistant": "assistant",
    "human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant",
}


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


def _messages(items: Any, role_key: str, content_key: str, what: str) -> list[dict[str, str]]:
    if not isinstance(items, list) or not items:
        raise RowError("missing_field", f"{what} must be a non-empty list")
    # LIMA style: a bare list of strings, alternating user / assistant.
    if all(isinstance(m, str) for m in items):
        return [{"role": ("user", "assistant")[i % 2], "content": _text(m, f"{what}[{i}]")}
                for i, m in enumerate(items)]
    out = []
    for i, message in enumerate(items):
        if not isinstance(message, dict):
            raise RowError("missing_field", f"{what}[{i}] is not an object")
        if role_key not in message:
            raise RowError("missing_field", f"{what}[{i}] has no '{role_key}'")
        role = ROLE_ALIASES.get(str(message[role_key]).lower()) if message[role_key] is not None else None
        if role is None:
            raise RowError("unknown_role", f"{what}[{i}] role '{message[role_key]}' (use system, user or assistant)")
        if content_key not in message:
            raise RowError("missing_field", f"{what}[{i}] has no '{content_key}'")
        out.append({"role": role, "content": _text(message[content_key], f"{what}[{i}].{content_key}")})
    return out


def _chat(row: dict, fmt: str, columns: dict[str, str]) -> dict:
    role_key, content_key = _col(columns, "role"), _col(columns, "content")
    if fmt == "messages":
        messages = _messages(_field(row, columns, "messages"), role_key, content_key, "messages")
    elif fmt == "sharegpt":
        messages = _messages(_field(row, columns, "conversations"), _col(columns, "from"), _col(columns, "value"),
                             "conversations")
    else:  # alpaca
        instruction = _text(_field(row, columns, "instruction"), "instruction")
        extra = _optional_text(row, columns, "input")
        user = instruction + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text(_field(row, columns, "output"), "output")}]
        system = _optional_text(row, columns, "system")
        if system:
            messages.insert(0, {"role": "system", "content": system})
    return {"kind": "chat", "messages": messages, "completion_start": 0}


def _prompt_completion(row: dict, columns: dict[str, str]) -> dict:
    prompt, completion = _field(row, columns, "prompt"), _field(row, columns, "completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        # Conversational prompt/completion: the chat template applies, loss on the completion turns.
        prompt_msgs = _messages(prompt, "role", "content", "prompt") if isinstance(prompt, list) \
            else [{"role": "user", "content": _text(prompt, "prompt")}]
        completion_msgs = _messages(completion, "role", "content", "completion") if isinstance(completion, list) \
            else [{"role": "assistant", "content": _text(completion, "completion")}]
        return {"kind": "chat", "messages": prompt_msgs + completion_msgs, "completion_start": len(prompt_msgs)}
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
