"""Loss masks are exact: the trained tokens decode to the replies plus their end-of-turn
markers, nothing else, under several chat-template families."""

import json

import pytest

from sft_cli.data.render import IGNORE_INDEX, Renderer, loss_labels
from sft_cli.data.templates import special_token_ids

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3? Ünïcödé 🙂"},
    {"role": "assistant", "content": "6, of course.\nNext line 中文."},
]
# What each family writes right after a reply: the token(s) that must carry loss.
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "zephyr": "</s>"}


def renderer(tokenizer, loss_on="assistant", max_seq_len=4096, overlong="drop"):
    return Renderer(tokenizer, loss_on, max_seq_len, overlong, formats={"s": "auto"}, columns={"s": {}},
                    special_ids=special_token_ids(tokenizer))


def encode(tokenizer, example, **kw):
    r = renderer(tokenizer, **kw)
    import json
    out = r({"raw": [json.dumps(example)], "source": ["s"], "location": ["f:1"], "error": [None]})
    return {k: v[0] for k, v in out.items()}


def trained_text(tokenizer, row):
    return tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])


def test_loss_labels_by_hand():
    # tokens cover chars [0,3) [3,5) [5,9) [9,9: zero-width) ; loss span [3, 9)
    assert loss_labels([10, 11, 12, 13], [(0, 3), (3, 5), (5, 9), (9, 9)], [(3, 9)]) == [-100, 11, 12, -100]
    assert loss_labels([10, 11], [(0, 2), (1, 4)], [(3, 5)]) == [-100, 11]  # straddling token trains


@pytest.mark.parametrize("family", ["chatml", "llama3", "zephyr"])
def test_exact_mask_every_assistant_turn(tiny_tokenizer, family):
    tok = tiny_tokenizer(family)
    row = encode(tok, {"messages": CONVERSATION})
    assert row["reason"] == "", row["detail"]
    eot = END_OF_TURN[family]
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    if family == "llama3":  # the Llama-3 template trims contents
        replies = [r.strip() for r in replies]
    assert trained_text(tok, row) == "".join(r + eot for r in replies)
    # Exactly the tokens of the reply spans are trained, in place: labels equal ids there.
    for token, label in zip(row["input_ids"], row["labels"]):
        assert label in (IGNORE_INDEX, token)


@pytest.mark.parametrize("family", ["chatml", "llama3", "zephyr"])
def test_last_assistant_and_all(tiny_tokenizer, family):
    tok = tiny_tokenizer(family)
    last = encode(tok, {"messages": CONVERSATION}, loss_on="last_assistant")
    reply = CONVERSATION[-1]["content"]
    assert trained_text(tok, last) == (reply.strip() if family == "llama3" else reply) + END_OF_TURN[family]
    everything = encode(tok, {"messages": CONVERSATION}, loss_on="all")
    assert everything["labels"] == [IGNORE_INDEX] + everything["input_ids"][1:]  # position 0 is never a target


@pytest.mark.parametrize("family", ["chatml", "llama3", "zephyr"])
def test_prompt_equals_inference_prompt(tiny_tokenizer, family):
    tok = tiny_tokenizer(family)
    r = renderer(tok)
    for i, message in enumerate(CONVERSATION):
        if message["role"] != "assistant":
            continue
        ours = r.render(CONVERSATION[:i], add_generation_prompt=True)
        assert ours == tok.apply_chat_template(CONVERSATION[:i], tokenize=False, add_generation_prompt=True)
    full_ids = encode(tok, {"messages": CONVERSATION})["input_ids"]
    theirs = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert full_ids == list(theirs)


def test_bos_never_doubled(tiny_tokenizer):
    tok = tiny_tokenizer("llama3")  # adds BOS by default AND its template writes BOS
    assert tok("x").input_ids[0] == tok.bos_token_id
    for example in ({"messages": CONVERSATION}, {"text": "plain words"}, {"prompt": "a", "completion": "b"}):
        ids = encode(tok, example)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert ids.count(tok.bos_token_id) == 1


def test_text_and_prompt_completion(tiny_tokenizer):
    tok = tiny_tokenizer("chatml")
    text = encode(tok, {"text": "The whole text trains."})
    assert text["labels"] == [IGNORE_INDEX] + text["input_ids"][1:] and text["input_ids"][-1] == tok.eos_token_id
    pc = encode(tok, {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"})
    assert trained_text(tok, pc) == "    return a + b\n" + tok.eos_token
    pc_all = encode(tok, {"prompt": "x", "completion": "y"}, loss_on="all")
    assert pc_all["labels"] == [IGNORE_INDEX] + pc_all["input_ids"][1:]


def test_conversational_prompt_completion_trains_only_completion(tiny_tokenizer):
    tok = tiny_tokenizer("chatml")
    row = encode(tok, {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]})
    assert trained_text(tok, row) == CONVERSATION[4]["content"] + "<|im_end|>"


def test_overlong_drop_and_truncate(tiny_tokenizer):
    tok = tiny_tokenizer("chatml")
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    dropped = encode(tok, long, max_seq_len=64)
    assert dropped["reason"] == "overlong" and dropped["input_ids"] == []
    cut = encode(tok, long, max_seq_len=64, overlong="truncate")
    assert cut["reason"] == "" and len(cut["input_ids"]) == 64 == len(cut["labels"])
    prompt_only = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    assert encode(tok, prompt_only, max_seq_len=64, overlong="truncate")["reason"] == "no_loss_tokens"


def _with_template(tok, template):
    copy = tok.__class__.from_pretrained(tok.name_or_path)
    copy.chat_template = template
    return copy


def test_template_that_rewrites_history_trains_turns_where_they_are_live(tiny_tokenizer):
    # Drops old assistant replies from history, as reasoning templates drop old thoughts: the first
    # reply is never rendered in the conversation as it was generated, so it must not train there.
    # It trains in its own example, the conversation up to it (reasoning_turns=all), or not at all (last).
    tok = _with_template(tiny_tokenizer("chatml"), (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"))
    raw = {"raw": [json.dumps({"messages": CONVERSATION})], "source": ["s"], "location": ["f:1"], "error": [None]}
    every = renderer(tok)(raw)
    assert every["reason"] == ["", ""] and every["turn_examples"][0] == 1
    assert [trained_text(tok, {"labels": labels}) for labels in every["labels"]] == \
        [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    last = Renderer(tok, "assistant", 4096, "drop", formats={"s": "auto"}, columns={"s": {}},
                    special_ids=special_token_ids(tok), reasoning_turns="last")(raw)
    assert last["reason"] == [""] and last["turns_untrained"][0] == 1
    assert trained_text(tok, {"labels": last["labels"][0]}) == CONVERSATION[-1]["content"] + "<|im_end|>"


def test_always_thinking_prompt_without_reasoning_gets_an_empty_think_block(tiny_tokenizer):
    # The inference prompt opens "<think>" and the data has no reasoning: the model, in that position,
    # closes an empty block and answers. That is what trains (counted), never a rejection of the row.
    tok = _with_template(tiny_tokenizer("chatml"), (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: <think>{% endif %}"))
    r = renderer(tok)
    out = r({"raw": [json.dumps({"messages": CONVERSATION})], "source": ["s"], "location": ["f:1"], "error": [None]})
    assert out["reason"] == ["", ""]  # each reply in its own example: history shows no think block
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    for labels, reply in zip(out["labels"], replies):
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "\n</think>\n\n" + reply + "<|im_end|>"
    assert out["empty_think_filled"][0] == 2 and out["turn_examples"][0] == 1


def test_template_closing_conversation_differently(tiny_tokenizer):
    # Phi-3 style: EOS only after the whole conversation. Each turn ends at its own marker; the
    # conversation's EOS is never generated (generation stops at the marker), so it does not train.
    tok = _with_template(tiny_tokenizer("chatml"), (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% else %}{{ eos_token }}{% endif %}"))
    row = encode(tok, {"messages": CONVERSATION})
    assert row["reason"] == ""
    assert trained_text(tok, row) == "It is 4.<|im_end|>" + CONVERSATION[-1]["content"] + "<|im_end|>"
