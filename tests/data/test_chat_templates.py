"""Tool calls and reasoning on every real chat template TRL ships (trl/chat_templates/*.jinja).

Each template is read by Hugging Face's own `apply_chat_template` as the oracle. For multi-turn plain,
tool-calling (one call, parallel calls, two rounds) and reasoning (`reasoning_content` and inline
`<think>`) conversations:

- every row the template renders in full (all of its data in HF's rendering) is kept;
- each trained span starts exactly where HF's generation prompt for that turn ends (the training
  prompt is the inference prompt), holds that turn's data and ends on a special token;
- nothing from system, user, tool results or tool schemas is trained;
- every assistant turn is trained once across a row's examples, and with `reasoning_turns=all`
  its reasoning is trained exactly once wherever a rendering of the conversation up to that turn
  shows it;
- BOS is never doubled;
- on each `*_training.jinja` twin, the labels equal HF's `return_assistant_tokens_mask`.

Every string below is unique (zq...), so "is it trained?" is a substring test on the trained text.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from sft_cli.data.formats import normalize
from sft_cli.data.render import IGNORE_INDEX, Renderer
from sft_cli.data.templates import special_token_ids

trl = pytest.importorskip("trl")
TEMPLATES = sorted((Path(trl.__file__).parent / "chat_templates").glob("*.jinja"))
PLAIN = [p for p in TEMPLATES if not p.stem.endswith("_training")]
TRAINING = [p for p in TEMPLATES if p.stem.endswith("_training")]
# Control tokens as the real tokenizers have them: role/turn markers are special tokens, while
# <think>, <tool_call> and friends are ordinary text (as in Qwen's tokenizer).
MARKER = re.compile(r"<\|[^|<>\s'\"]{1,40}\|>|<｜[^｜<>]{1,40}｜>|<\|[\w\"]{1,20}>|<[\w\"]{1,20}\|>"
                    r"|<(?:start|end)_of_turn>|<end_of_utterance>|\[gMASK\]|<sop>|</?s>|\[/?[A-Z_]{3,}\]")

SCHEMA = {"type": "function", "function": {"name": "zq_weather", "description": "zqSchemaDescription",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "zqParamDescription"}},
                                               "required": ["city"]}}}
SCHEMA2 = {"type": "function", "function": {"name": "zq_time", "description": "zqSchemaDescription2",
                                            "parameters": {"type": "object", "properties": {
                                                "zone": {"type": "string"}}}}}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "zqSystem"}
CONVERSATIONS = {
    "plain": {"messages": [SYSTEM, {"role": "user", "content": "zqUser1"},
                           {"role": "assistant", "content": "zqReply1"},
                           {"role": "user", "content": "zqUser2"}, {"role": "assistant", "content": "zqReply2"}]},
    "one_call": {"tools": [SCHEMA], "messages": [
        {"role": "user", "content": "zqUser1"},
        {"role": "assistant", "content": None, "tool_calls": [call("zq_weather", city="zqParis")]},
        {"role": "tool", "content": "zqResult1", "tool_call_id": "c1"},
        {"role": "assistant", "content": "zqReply1"}]},
    "parallel_calls": {"tools": [SCHEMA, SCHEMA2], "messages": [
        {"role": "user", "content": "zqUser1"},
        {"role": "assistant", "content": "", "tool_calls": [call("zq_weather", city="zqParis"),
                                                            call("zq_time", zone="zqZone")]},
        {"role": "tool", "content": "zqResult1"}, {"role": "tool", "content": "zqResult2"},
        {"role": "assistant", "content": "zqReply1"}]},
    "two_rounds": {"tools": json.dumps([SCHEMA, SCHEMA2]), "messages": [  # tools as JSON text, as datasets store them
        {"role": "user", "content": "zqUser1"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "zq_weather", "arguments": '{"city": "zqParis"}'}}]},
        {"role": "tool", "content": "zqResult1"},
        {"role": "assistant", "content": None, "tool_calls": [call("zq_time", zone="zqZone")]},
        {"role": "tool", "content": "zqResult2"},
        {"role": "assistant", "content": "zqReply1"}]},
    "reasoning": {"messages": [SYSTEM, {"role": "user", "content": "zqUser1"},
                               {"role": "assistant", "content": "zqReply1", "reasoning_content": "zqThought1"},
                               {"role": "user", "content": "zqUser2"},
                               {"role": "assistant", "content": "zqReply2", "reasoning_content": "zqThought2"}]},
    "inline_reasoning": {"messages": [{"role": "user", "content": "zqUser1"},
                                      {"role": "assistant", "content": "<think>\nzqThought1\n</think>\n\nzqReply1"},
                                      {"role": "user", "content": "zqUser2"},
                                      {"role": "assistant", "content": "<think>zqThought2</think>zqReply2"}]},
}
NEVER_TRAINED = ("zqSystem", "zqUser1", "zqUser2", "zqResult1", "zqResult2", "zqSchemaDescription",
                 "zqParamDescription")


@pytest.fixture(scope="module")
def base_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir("chatml")))


def tokenizer_for(base, template: str):
    """The tiny tokenizer with this template and its markers as special tokens, like the real one."""
    tok = base.__class__.from_pretrained(base.name_or_path)
    tok.chat_template = template
    markers = sorted(set(MARKER.findall(template)) - set(tok.get_vocab()))
    if markers:
        tok.add_tokens(markers, special_tokens=True)
    if "bos_token" in template and tok.bos_token is None:  # the real tokenizers of such templates have one
        tok.add_special_tokens({"bos_token": "<|bos|>"})
    for name in ("<think>", "</think>", "<tool_call>", "</tool_call>"):
        if name in template and name not in tok.get_vocab():
            tok.add_tokens([name])
    return tok


def renderer(tok, **kw):
    return Renderer(tok, kw.pop("loss_on", "assistant"), 100_000, "drop", formats={"s": "auto"}, columns={"s": {}},
                    special_ids=special_token_ids(tok), **kw)


def prepare_row(r, row: dict) -> dict:
    return r({"raw": [json.dumps(row)], "source": ["s"], "location": ["f:1"], "error": [None]})


def hf_render(tok, messages, tools=None, add_generation_prompt=False):
    try:
        return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:
        return None


def data_pieces(row: dict) -> list[str]:
    """Every string of the row's data that a full rendering must show."""
    pieces = []
    for m in row["messages"]:
        content = m.get("content") or ""
        pieces += re.findall(r"zq\w+", content)
        pieces += [m["reasoning_content"]] if m.get("reasoning_content") else []
        for c in m.get("tool_calls") or []:
            args = c["function"]["arguments"]
            pieces += [c["function"]["name"], *re.findall(r"zq\w+", json.dumps(args))]
    tools = row.get("tools")
    if tools:
        pieces += [t["function"]["name"] for t in (json.loads(tools) if isinstance(tools, str) else tools)]
    return pieces


def hf_renders_in_full(tok, row: dict) -> bool:
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    text = hf_render(tok, row["messages"], tools)
    return text is not None and all(p in text for p in data_pieces(row))


def spans_of(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for t, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = t
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, t))
            start = None
    return runs


# Rows a template renders in full but never as inference sees them. DeepSeek-V3 renders a tool call
# that follows a tool result inside the still-open tool-output block, while its inference prompt
# closes that block: no rendering of the second round matches a prompt (see the xfail test below).
UNEXPRESSIBLE = {("deepseekv3", "two_rounds")}


def check_row(tok, r, name: str, row: dict, template: str = "") -> dict:
    out = prepare_row(r, row)
    kept = not out["reason"][0]
    if (template, name) in UNEXPRESSIBLE:
        assert out["reason"][0] == "template_mismatch", out["reason"]
        return {"kept": False, "reason": out["reason"][0]}
    if hf_renders_in_full(tok, row):
        assert kept, f"{name}: HF renders it in full but it was rejected: {out['reason'][0]}: {out['detail'][0]}"
    if not kept:
        assert out["reason"][0] not in ("unexpected_error", "template_mismatch"), out["detail"][0]
        return {"kept": False, "reason": out["reason"][0]}
    example = normalize(json.dumps(row), "auto", {})
    messages = example["messages"]
    specials = special_token_ids(tok)
    trained_texts = []
    for ids, labels in zip(out["input_ids"], out["labels"]):
        assert len(ids) < 2 or not (ids[0] == ids[1] == tok.bos_token_id), "BOS doubled"
        for start, end in spans_of(labels):
            trained = tok.decode(ids[start:end])
            trained_texts.append(trained)
            # Ends on its end token ({% generation %} templates may also train the newline after it).
            last = max(t for t in range(start, end) if tok.decode(ids[t:t + 1]).strip())
            assert ids[last] in specials, f"{name}: a trained turn ends on {tok.decode(ids[last:last + 1])!r}"
            for secret in NEVER_TRAINED:
                assert secret not in trained, f"{name}: {secret} is trained: {trained!r}"
            # The prompt before the span is the inference prompt of the turn the span trains.
            prompt = tok.decode(ids[:start])
            turn = next(i for i, m in enumerate(messages) if m["role"] == "assistant" and any(
                p in trained for p in data_pieces({"messages": [m]})))
            tools = example.get("tools")
            inference = hf_render(tok, r.chat.for_template(messages[:turn], Counter()),
                                  tools, add_generation_prompt=True)
            assert inference is not None and prompt == inference, f"{name}: turn {turn} prompt differs from inference"
    everything = "\n".join(trained_texts)
    for m in messages:
        if m["role"] != "assistant":
            continue
        for piece in data_pieces({"messages": [m]}):
            if piece.startswith("zqThought") and (r.chat.uses_generation_blocks or r.chat.reasoning_format == "drop"):
                continue  # {% generation %} markers decide what trains (history reasoning is theirs to drop)
            # Every assistant turn (and its reasoning) is trained, exactly once.
            assert everything.count(piece) >= 1, f"{name}: {piece} never trained"
            if piece.startswith(("zqReply", "zqThought")):
                assert everything.count(piece) == 1, f"{name}: {piece} trained {everything.count(piece)} times"
    return {"kept": True, "examples": len(out["input_ids"])}


@pytest.mark.parametrize("path", PLAIN, ids=lambda p: p.stem)
def test_real_template_tool_calls_and_reasoning(base_tokenizer, path):
    tok = tokenizer_for(base_tokenizer, path.read_text())
    r = renderer(tok)
    results = {name: check_row(tok, r, name, row, path.stem) for name, row in CONVERSATIONS.items()}
    # Plain multi-turn chats and reasoning are expressible on every text template (reasoning inlined
    # where there is no place for it); only templates that refuse a system turn may reject them, and
    # a non-thinking prompt (it closes the think block itself) leaves no room for reasoning.
    no_thinking = "</think>" in (hf_render(tok, [{"role": "user", "content": "x"}], add_generation_prompt=True) or "")
    for name in ("plain", "reasoning", "inline_reasoning"):
        if not results[name]["kept"]:
            allowed = ("template_error", "template_drops_reasoning") if no_thinking and name != "plain" \
                else ("template_error",)
            assert results[name]["reason"] in allowed, (name, results[name])
    if no_thinking:  # reasoning_format=drop trains such rows' answers
        dropped = prepare_row(renderer(tok, reasoning_format="drop"), CONVERSATIONS["reasoning"])
        assert set(dropped["reason"]) == {""} and dropped["reasoning_dropped"][0] == 2


@pytest.mark.xfail(strict=True, reason="DeepSeek-V3's template renders a tool call after a tool result inside the "
                   "open tool-output block, unlike its inference prompt; such rows are rejected (template_mismatch)")
def test_deepseekv3_second_round_of_tool_calls(base_tokenizer):
    v3 = next(p for p in PLAIN if p.stem == "deepseekv3")
    tok = tokenizer_for(base_tokenizer, v3.read_text())
    assert prepare_row(renderer(tok), CONVERSATIONS["two_rounds"])["reason"] == [""]


def test_reasoning_turns_last_trains_only_what_the_full_rendering_keeps(base_tokenizer):
    qwen3 = next(p for p in PLAIN if p.stem == "qwen3")
    tok = tokenizer_for(base_tokenizer, qwen3.read_text())
    row = CONVERSATIONS["reasoning"]
    every = prepare_row(renderer(tok), row)
    last = prepare_row(renderer(tok, reasoning_turns="last"), row)
    assert len(every["input_ids"]) == 2 and len(last["input_ids"]) == 1
    trained = tok.decode([t for t in last["labels"][0] if t != IGNORE_INDEX])
    assert "zqThought2" in trained and "zqReply2" in trained and "zqReply1" not in trained
    assert every["turn_examples"][0] == 1 and last["turns_untrained"][0] == 1


def test_reasoning_without_a_place_is_inlined_or_dropped(base_tokenizer):
    llama3 = next(p for p in PLAIN if p.stem == "llama3")
    tok = tokenizer_for(base_tokenizer, llama3.read_text())
    row = CONVERSATIONS["reasoning"]
    inline = prepare_row(renderer(tok), row)
    trained = tok.decode([t for t in inline["labels"][0] if t != IGNORE_INDEX])
    assert "<think>\nzqThought1\n</think>\n\nzqReply1" in trained and inline["reasoning_inlined"][0] == 2
    dropped = prepare_row(renderer(tok, reasoning_format="drop"), row)
    trained = tok.decode([t for t in dropped["labels"][0] if t != IGNORE_INDEX])
    assert "zqThought" not in trained and "zqReply2" in trained and dropped["reasoning_dropped"][0] == 2


def test_r1_distill_trains_the_reasoning_it_drops(base_tokenizer):
    # The template strips reasoning even from the last turn, and the prompt opens <think>\n.
    r1 = next(p for p in PLAIN if p.stem == "deepseek_r1_distill")
    tok = tokenizer_for(base_tokenizer, r1.read_text())
    out = prepare_row(renderer(tok), CONVERSATIONS["reasoning"])
    texts = [tok.decode([t for t in labels if t != IGNORE_INDEX]) for labels in out["labels"]]
    assert texts == ["zqThought1\n</think>\n\nzqReply1<｜end▁of▁sentence｜>",
                     "zqThought2\n</think>\n\nzqReply2<｜end▁of▁sentence｜>"]
    plain = prepare_row(renderer(tok), CONVERSATIONS["plain"])  # no reasoning: an empty block, counted
    assert tok.decode([t for t in plain["labels"][-1] if t != IGNORE_INDEX]) == \
        "\n</think>\n\nzqReply2<｜end▁of▁sentence｜>"
    assert plain["empty_think_filled"][0] == 2


def test_glm_trains_the_role_marker_that_stops_it(base_tokenizer):
    glm = next(p for p in PLAIN if p.stem == "glm4moe")
    tok = tokenizer_for(base_tokenizer, glm.read_text())
    out = prepare_row(renderer(tok), CONVERSATIONS["one_call"])
    trained = [tok.decode(out["input_ids"][0][a:b]) for a, b in spans_of(out["labels"][0])]
    assert trained[0].endswith("</tool_call><|observation|>") and trained[-1].endswith("zqReply1<|user|>")
    ids = {tok.convert_tokens_to_ids("<|observation|>"), tok.convert_tokens_to_ids("<|user|>")}
    assert ids <= set(sum(out["stop_ids"], []))
    assert {"<|user|>", "<|observation|>"} <= set(renderer(tok).stop_tokens())  # -> final/'s generation config


def test_gpt_oss_closes_turns_as_generated(base_tokenizer):
    gptoss = next(p for p in PLAIN if p.stem == "gptoss")
    tok = tokenizer_for(base_tokenizer, gptoss.read_text())
    out = prepare_row(renderer(tok), CONVERSATIONS["plain"])
    trained = [tok.decode(out["input_ids"][0][a:b]) for a, b in spans_of(out["labels"][0])]
    assert trained == ["<|channel|>final<|message|>zqReply1<|end|>", "<|channel|>final<|message|>zqReply2<|return|>"]
    calls = prepare_row(renderer(tok), CONVERSATIONS["one_call"])
    first = tok.decode([t for t in calls["labels"][0] if t != IGNORE_INDEX])
    assert "<|call|>" in first and tok.convert_tokens_to_ids("<|call|>") in calls["stop_ids"][0]
    assert {"<|return|>", "<|call|>"} <= set(renderer(tok).stop_tokens())


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.stem)
def test_generation_blocks_equal_hf_assistant_masks(base_tokenizer, path):
    """`{% generation %}` templates: their markers decide what trains, exactly as HF's mask says."""
    tok = tokenizer_for(base_tokenizer, path.read_text())
    r = renderer(tok)
    compared = 0
    for name, row in CONVERSATIONS.items():
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        messages = r.chat.for_template(normalize(json.dumps(row), "auto", {})["messages"],
                                       Counter())
        try:
            hf = tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        except Exception:
            continue
        out = prepare_row(r, row)
        if out["reason"][0]:
            assert out["reason"][0].startswith("template_drops"), (name, out["reason"][0], out["detail"][0])
            continue
        assert out["input_ids"][0] == list(hf["input_ids"]), name
        mask = [1 if label != IGNORE_INDEX else 0 for label in out["labels"][0]]
        expected = list(hf["assistant_masks"])
        expected[0] = 0  # position 0 is never a target (nothing precedes it)
        assert mask == expected, name
        compared += 1
    assert compared >= 1


# Hand-written traps, one per template behaviour the real ones above do not all show.
MISTRAL_LIKE = (  # tool calls need 9-character ids, results name them; [TOOL_CALLS] syntax
    "{{ bos_token }}{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' and m.tool_calls is defined -%}[TOOL_CALLS][{%- for c in m.tool_calls -%}"
    "{%- if c.id is not defined or c.id | length != 9 -%}{{ raise_exception('Tool call IDs should be alphanumeric "
    "strings with length 9!') }}{%- endif -%}"
    "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}, \"id\": \"{{ c.id }}\"}"
    "{%- endfor -%}]{{ eos_token }}"
    "{%- elif m.role == 'assistant' -%}{{ m.content }}{{ eos_token }}"
    "{%- elif m.role == 'tool' -%}[TOOL_RESULTS]{{ m.tool_call_id }}: {{ m.content }}[/TOOL_RESULTS]"
    "{%- endif -%}{%- endfor -%}")
NO_TOOLS = ("{%- for m in messages -%}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor -%}"
            "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}")


def test_calls_get_the_ids_a_template_requires(base_tokenizer):
    tok = tokenizer_for(base_tokenizer, MISTRAL_LIKE)
    r = renderer(tok)
    for name in ("one_call", "parallel_calls", "two_rounds"):
        result = check_row(tok, r, name, CONVERSATIONS[name])
        assert result["kept"], (name, result)
    assert r.chat.profile["ids"]
    out = prepare_row(r, CONVERSATIONS["parallel_calls"])
    text = tok.decode(out["input_ids"][0])
    assert '"id": "c00010000"' in text and "[TOOL_RESULTS]c00010001: zqResult2" in text  # results follow their calls


def test_a_template_that_ignores_tools_rejects_rows_with_tools(base_tokenizer):
    tok = tokenizer_for(base_tokenizer, NO_TOOLS)
    r = renderer(tok)
    assert prepare_row(r, CONVERSATIONS["one_call"])["reason"] == ["template_drops_tools"]
    no_schema = {"messages": CONVERSATIONS["one_call"]["messages"]}  # calls, but the template has no syntax for them
    assert prepare_row(r, no_schema)["reason"] == ["template_drops_tool_calls"]
    assert prepare_row(r, CONVERSATIONS["plain"])["reason"] == [""]
