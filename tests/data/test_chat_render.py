"""A row's renders (the template-safe copies of its messages made once) equal render_jinja_template's,
on every template TRL ships, for every prefix of every conversation, with and without the generation
prompt, errors included."""

import json
from collections import Counter
from pathlib import Path

import pytest

from sft_cli.data.chat import ChatRenderer
from sft_cli.data.formats import RowError, normalize

trl = pytest.importorskip("trl")
TEMPLATES = sorted((Path(trl.__file__).parent / "chat_templates").glob("*.jinja"))
TOOLS = [{"type": "function", "function": {"name": "zq_weather", "description": "Weather now",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ROWS = [
    {"messages": [{"role": "system", "content": "zqSystem"}, {"role": "user", "content": "zqUser1"},
                  {"role": "assistant", "content": "zqReply1", "reasoning_content": "zqThought1"},
                  {"role": "user", "content": "zqUser2"}, {"role": "assistant", "content": "<think>zqT2</think>zqR2"}]},
    {"tools": TOOLS, "messages": [
        {"role": "user", "content": "zqUser1"},
        {"role": "assistant", "content": None, "reasoning_content": "zqThought1", "tool_calls": [
            {"type": "function", "function": {"name": "zq_weather", "arguments": {"city": "zqParis"}}}]},
        {"role": "tool", "content": "zqResult1"}, {"role": "assistant", "content": "zqReply1"}]},
]


def outcome(render, *args):
    try:
        return render(*args)
    except RowError as exc:
        return ("error", exc.reason, exc.detail)


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_row_renders_equal_render_jinja_template(path):
    chat = ChatRenderer(path.read_text(), {"bos_token": "<s>", "eos_token": "</s>"}, ["<s>", "</s>"])
    for row in ROWS:
        example = normalize(json.dumps(row), "auto", {})
        messages = chat.for_template(example["messages"], Counter())
        tools = example.get("tools")
        row_render = chat.row_renderer(messages, tools, {"enable_thinking": True})
        changed = messages[:-1] + [{**messages[-1], "reasoning_content": "zqSentinel"}]  # not one of the row's
        for upto in [messages[:i] for i in range(len(messages) + 1)] + [changed]:
            for generation_prompt in (False, True):
                ours = outcome(row_render, upto, generation_prompt)
                theirs = outcome(chat.render, upto, generation_prompt, tools, {"enable_thinking": True})
                assert ours == theirs, (path.stem, len(upto), generation_prompt)
