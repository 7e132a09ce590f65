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


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def test_tool_calls_arguments_as_object_or_json_text_normalise_alike():
    as_object = {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
    as_text = {"role": "assistant", "content": "",
               "tool_calls": [{"id": "c1", "type": "function",
                               "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]}
    rows = [norm({"messages": [CHAT[0], call, {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                               CHAT[1]], "tools": tools})
            for call, tools in ((as_object, [WEATHER]), (as_text, json.dumps([WEATHER])))]
    assert rows[0] == rows[1] and example_hash(rows[0]) == example_hash(rows[1])
    messages = rows[0]["messages"]
    assert messages[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "weather"}
    assert rows[0]["tools"] == [WEATHER]


def test_bare_tool_specs_are_wrapped_and_json_results_dumped():
    example = norm({"messages": [CHAT[0], {"role": "tool", "content": {"temp": 21}}, CHAT[1]],
                    "tools": [{"name": "weather", "parameters": {}}]})
    assert example["tools"] == [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    assert example["messages"][1]["content"] == '{"temp": 21}'


def test_reasoning_fields_and_inline_think_normalise_alike():
    expected = {"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4"}
    for message in ({"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4"},
                    {"role": "assistant", "content": "4", "reasoning": "2+2 is 4"},
                    {"role": "assistant", "content": "4", "thinking": "2+2 is 4"},
                    {"role": "assistant", "content": "<think>\n2+2 is 4\n</think>\n\n4"},
                    {"role": "assistant", "content": "2+2 is 4</think>4"}):  # R1 style: opened by the prompt
        assert norm({"messages": [CHAT[0], message]})["messages"][1] == expected


def test_sharegpt_function_call_and_observation():
    example = norm({"conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "Sunny."}], "tools": json.dumps([WEATHER]), "system": "Be brief"})
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert example["messages"][2]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Paris"}}
    assert example["messages"][3]["name"] == "weather"


def test_developer_role_and_row_template_kwargs():
    example = norm({"messages": [{"role": "developer", "content": "Rules"}, *CHAT],
                    "chat_template_kwargs": {"enable_thinking": False}})
    assert example["messages"][0]["role"] == "developer"
    assert example["template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize("message, reason", [
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": {}}}]}, "malformed_tool_call"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "malformed_tool_arguments"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     "malformed_tool_arguments"),
    ({"role": "assistant", "content": None}, "empty_content"),
    ({"role": "assistant", "content": "<think>only thoughts</think>"}, "empty_content"),
])
def test_bad_tool_and_reasoning_rows_have_reasons(message, reason):
    with pytest.raises(RowError) as info:
        norm({"messages": [CHAT[0], message]})
    assert info.value.reason == reason


def test_malformed_tools_column():
    with pytest.raises(RowError) as info:
        norm({"messages": CHAT, "tools": "[{not json"})
    assert info.value.reason == "malformed_tools"
