"""Every input format normalises to the same example; every bad row gets its reason."""

import json

import pytest

from sft_cli.data.formats import RowError, check_trainable, example_hash, normalize

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def norm(row, fmt="auto", columns=None):
    return normalize(json.dumps(row), fmt, columns or {})


@pytest.mark.parametrize("row", [
    {"messages": CHAT},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                  {"role": "assistant", "content": "Hello"}]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {"conversations": ["Hi", "Hello"]},  # LIMA: alternating strings
    {"instruction": "Hi", "output": "Hello"},
    {"instruction": "Hi", "input": "", "output": "Hello"},
])
def test_chat_formats_normalise_alike(row):
    example = norm(row)
    assert example == {"kind": "chat", "messages": CHAT, "completion_start": 0}
    assert example_hash(example) == example_hash(norm({"messages": CHAT}))


def test_alpaca_input_and_system():
    example = norm({"instruction": "Sum", "input": "2 2", "output": "4", "system": "Be terse"})
    assert example["messages"] == [{"role": "system", "content": "Be terse"},
                                   {"role": "user", "content": "Sum\n\n2 2"},
                                   {"role": "assistant", "content": "4"}]


def test_prompt_completion_strings_and_messages():
    assert norm({"prompt": "1+1=", "completion": "2"}) == {"kind": "prompt_completion", "prompt": "1+1=",
                                                           "completion": "2"}
    conversational = norm({"prompt": [CHAT[0]], "completion": [CHAT[1]]})
    assert conversational == {"kind": "chat", "messages": CHAT, "completion_start": 1}


def test_text_and_column_mapping():
    assert norm({"body": "abc"}, "text", {"text": "body"}) == {"kind": "text", "text": "abc"}
    mapped = norm({"dialog": [{"speaker": "user", "utterance": "Hi"}, {"speaker": "assistant", "utterance": "Hello"}]},
                  "messages", {"messages": "dialog", "role": "speaker", "content": "utterance"})
    assert mapped["messages"] == CHAT


@pytest.mark.parametrize("raw, reason", [
    ('{"messages": [', "malformed_json"),
    ("[1, 2]", "malformed_json"),
    ('{"foo": 1}', "unknown_format"),
    ('{"messages": [{"role": "narrator", "content": "x"}]}', "unknown_role"),
    ('{"messages": [{"role": "user", "content": "  "}]}', "empty_content"),
    ('{"messages": [{"role": "user", "content": null}]}', "empty_content"),
    ('{"messages": [{"role": "user", "content": 3}]}', "non_string_content"),
    ('{"messages": [{"role": "user"}]}', "missing_field"),
    ('{"messages": []}', "missing_field"),
    ('{"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]}', "unsupported_content"),
    ('{"instruction": "x"}', "unknown_format"),
])
def test_bad_rows_have_reasons(raw, reason):
    with pytest.raises(RowError) as info:
        normalize(raw, "auto", {})
    assert info.value.reason == reason


def test_explicit_format_missing_field():
    with pytest.raises(RowError) as info:
        normalize('{"text": "x"}', "messages", {})
    assert info.value.reason == "missing_field"


def test_trainability_depends_on_loss_on():
    no_reply = {"kind": "chat", "messages": [CHAT[0]], "completion_start": 0}
    with pytest.raises(RowError, match="no_assistant_turn"):
        check_trainable(no_reply, "assistant")
    dangling = {"kind": "chat", "messages": CHAT + [CHAT[0]], "completion_start": 0}
    with pytest.raises(RowError, match="not_ending_with_assistant"):
        check_trainable(dangling, "assistant")
    check_trainable(dangling, "all")  # every token trains: a trailing user turn is fine
