"""`sft prepare` on tool-calling and reasoning data through the real CLI: counts, stop tokens,
the eval split keeps a conversation's examples together, and `show` marks what is what."""

import json
from pathlib import Path

import datasets
import pytest

from sft_cli.console import token_kinds

trl = pytest.importorskip("trl")
QWEN3 = Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja"
MODEL = "model.name_or_path=builtin:tiny-llama-chatml"
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather now",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def row(i: int) -> dict:
    return {"tools": json.dumps(TOOLS) if i % 2 else TOOLS, "messages": [
        {"role": "user", "content": f"Weather in city {i}?"},
        {"role": "assistant", "content": None, "reasoning_content": f"Call the tool for {i}.",
         "tool_calls": [{"type": "function", "function": {"name": "weather",
                                                          "arguments": json.dumps({"city": f"c{i}"}) if i % 3
                                                          else {"city": f"c{i}"}}}]},
        {"role": "tool", "content": f"sunny {i}"},
        {"role": "assistant", "content": f"<think>It is sunny.</think>Sunny in {i}."},
        {"role": "user", "content": f"Thanks {i}"},
        {"role": "assistant", "content": f"You are welcome {i}.", "reasoning_content": f"Be polite {i}."}]}


def test_tool_and_reasoning_rows_prepare_with_counts(tmp_path, write_jsonl, sft):
    data = write_jsonl(tmp_path / "agent.jsonl", [row(i) for i in range(12)] + [
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                                       "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]}])
    run = tmp_path / "run"
    result = sft("prepare", MODEL, f"data.sources=[{{path: {data}}}]", f"data.chat_template={QWEN3}",
                 "data.eval_fraction=0.25", "show=1", f"run_dir={run}")
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "prepared" / "report.json").read_text())
    assert report["read"] == 13 and report["kept"] == 12
    assert report["rejected_by_reason"] == {"malformed_tool_arguments": 1}
    chat = report["chat"]
    # Qwen3 drops the reasoning of turns before the last user message: turns 1 and 3 of each row get
    # their own examples; the last turn trains in the full conversation.
    assert chat["rows_with_tools"] == 12 and chat["tool_calls_trained"] == 12
    assert chat["turns_trained"] == 36 and chat["reasoning_turns_trained"] == 36
    assert chat["turn_examples"] == 24 and report["examples"] == 36
    assert report["train_examples"] + report["eval_examples"] == 36
    assert "tool calls and reasoning" in result.stdout and "tool calls cyan" in result.stdout
    prepared = datasets.load_from_disk(str(run / "prepared"))
    # A conversation's examples stay on one side of the split.
    sides = {split: {r["location"] for r in prepared[split]} for split in prepared}
    assert not sides["train"] & sides["eval"] and len(sides["eval"]) == 3
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run / "prepared" / "tokenizer"))
    assert report["eot_token_ids"] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]  # every turn ends there


def test_token_kinds_mark_reasoning_tool_calls_and_results():
    pieces = ["<|im_start|>assistant\n", "<think>", "plan", "</think>", "\n\n", "<tool_call>", "{...}",
              "</tool_call>", "<|im_end|>", "<tool_response>", "sunny", "</tool_response>"]
    trained = [False] + [True] * 8 + [False] * 3
    assert token_kinds(pieces, trained) == ["prompt", "reasoning", "reasoning", "reasoning", "trained", "tool_call",
                                            "tool_call", "tool_call", "trained", "tool_context", "tool_context",
                                            "tool_context"]
