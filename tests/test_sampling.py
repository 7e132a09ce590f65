"""sampling.py: per-sample seeded streams (batch-invariant, a correct sampler), greedy = model.generate,
replies split into reasoning and content, stop tokens, and the vLLM engine's contract (with a stand-in)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from sft_cli.sampling import (
    Completion,
    Prompt,
    SamplingParams,
    SeededGumbel,
    TransformersEngine,
    cut_at_stop,
    decode_reply,
    stop_token_ids,
    stream_seed,
)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_dir("chatml")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def _prompts(tokenizer, texts):
    return [Prompt(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"], key=i)
            for i, t in enumerate(texts)]


def _run(engine, prompts, params):
    return dict(engine.generate(prompts, params))


def test_samples_do_not_depend_on_batching_or_order(tiny):
    model, tok = tiny
    engine = TransformersEngine(model, tok.pad_token_id, [tok.eos_token_id])
    prompts = _prompts(tok, ["Say something 1", "A much longer prompt with many more words in it", "hi"])
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=5, batch_size=9)
    together = _run(engine, prompts, params)
    one_by_one = _run(engine, prompts, SamplingParams(**{**params.__dict__, "batch_size": 1}))
    reversed_ = _run(engine, prompts[::-1], params)
    assert list(together) == [0, 1, 2]  # yielded in input order
    for i in range(3):
        assert [c.token_ids for c in together[i]] == [c.token_ids for c in one_by_one[i]]
        assert [c.token_ids for c in together[i]] == [c.token_ids for c in reversed_[2 - i]]
    # The samples of one prompt differ from each other (their streams differ), and another seed differs.
    assert len({tuple(c.token_ids) for c in together[1]}) > 1
    other_seed = _run(engine, prompts, SamplingParams(**{**params.__dict__, "seed": 6}))
    assert [c.token_ids for c in other_seed[1]] != [c.token_ids for c in together[1]]


def test_temperature_zero_is_model_generate_greedy(tiny):
    model, tok = tiny
    engine = TransformersEngine(model, tok.pad_token_id, [tok.eos_token_id])
    prompts = _prompts(tok, ["Say something 7", "another prompt here"])
    ours = _run(engine, prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=10, batch_size=2))
    for i, p in enumerate(prompts):
        ids = torch.tensor([p.ids])
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(p.ids):].tolist()
        assert ours[i][0].token_ids == cut_at_stop(theirs, {tok.eos_token_id}).token_ids


def test_seeded_gumbel_draws_from_softmax():
    """argmax(logits + Gumbel) over many streams: the empirical distribution is softmax(logits)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -math_inf()]])
    draws = 6000
    counts = np.zeros(5)
    for key in range(draws):
        noised = SeededGumbel([key], prompt_width=3)(torch.zeros(1, 3, dtype=torch.long), logits.clone())
        counts[int(noised.argmax())] += 1
    expected = torch.softmax(logits, -1)[0].numpy()
    assert counts[4] == 0  # a masked (-inf) token is never drawn
    assert np.allclose(counts / draws, expected, atol=0.02)
    # The step (tokens generated so far) is part of the stream: the next position draws fresh noise.
    a = SeededGumbel([1], 3)(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 50))
    b = SeededGumbel([1], 3)(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 50))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.95, 0.999])
def test_top_p_keeps_what_transformers_keeps(p):
    from transformers.generation.logits_process import TopPLogitsWarper

    from sft_cli.sampling import TopP

    torch.manual_seed(0)
    # Peaked rows (nucleus within the probe) and flat rows (wider: the full-sort path), with -inf entries.
    scores = torch.cat([torch.randn(3, 2000) * 4, torch.randn(3, 2000) * 0.01])
    scores[0, :10] = -float("inf")
    ours = TopP(p, probe=64)(None, scores.clone())
    theirs = TopPLogitsWarper(p)(None, scores.clone())
    assert torch.equal(ours.isinf(), theirs.isinf())
    assert torch.equal(ours[~ours.isinf()], scores[~ours.isinf()])  # kept scores are untouched
    assert (~ours.isinf()).sum(-1).min() >= 1


def math_inf() -> float:
    return float("inf")


def test_stream_seed_is_stable_and_separates_parts():
    assert stream_seed(1, 2, 3) == stream_seed(1, 2, 3)
    assert len({stream_seed(1, 2, 3), stream_seed(1, 3, 2), stream_seed(2, 2, 3), stream_seed(1, 2)}) == 4
    assert 0 <= stream_seed(2**63 - 1, 5) < 2**63


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 9, 7], {9}) == Completion([5, 6], True)
    assert cut_at_stop([5, 6, 7], {9}) == Completion([5, 6, 7], False)


def test_decode_reply_splits_reasoning(tiny):
    _, tok = tiny

    def reply(text, opened=False):
        return decode_reply(tok, tok(text, add_special_tokens=False).input_ids, opened)

    plain = reply("just an answer")
    assert (plain.content, plain.reasoning) == ("just an answer", None)
    # The prompt opened the block (<think>\n ends the generation prompt): the reply starts inside it.
    opened = reply("step one, step two\n</think>\n\nThe answer is 4.", opened=True)
    assert (opened.reasoning, opened.content) == ("step one, step two", "The answer is 4.")
    # The reply opens the block itself (Qwen3).
    qwen3 = reply("<think>\nhmm\n</think>\n\nyes")
    assert (qwen3.reasoning, qwen3.content) == ("hmm", "yes")
    # Reasoning that never closed (cut at max_new_tokens): no content.
    unfinished = reply("still thinking about it", opened=True)
    assert (unfinished.reasoning, unfinished.content) == ("still thinking about it", "")
    # gpt-oss harmony channels.
    harmony = reply("<|channel|>analysis<|message|>think hard<|end|><|start|>assistant<|channel|>final<|message|>42")
    assert (harmony.reasoning, harmony.content) == ("think hard", "42")


def test_decode_reply_drops_special_tokens(tiny):
    _, tok = tiny
    ids = tok("hello", add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert decode_reply(tok, ids).content == "hello"


def test_stop_tokens_of_a_chat_template(tiny, tmp_path):
    import json

    _, tok = tiny
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(tok)
    (tmp_path / "report.json").write_text(json.dumps({"eot_token_ids": [7]}))
    assert {7, im_end} <= set(stop_token_ids(tok, tmp_path))  # a run's trained end tokens too


def test_vllm_engine_contract(monkeypatch):
    """The vLLM engine with a stand-in `vllm` module: one request per prompt with n samples, the
    prompt's own seed, stop ids and token ids in; completions cut at the stop token, in prompt order."""
    calls = {}

    class FakeParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class FakeLLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def generate(self, prompts, sampling, lora_request=None, use_tqdm=True):
            calls.setdefault("generate", []).append((prompts, sampling))
            out = []
            for p, s in zip(prompts, sampling):
                samples = [types.SimpleNamespace(token_ids=p["prompt_token_ids"][:1] + [k, 99, 5],
                                                 finish_reason="stop") for k in range(s.kwargs["n"])]
                out.append(types.SimpleNamespace(outputs=samples))
            return out

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, FakeParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    from sft_cli.sampling import VllmEngine

    engine = VllmEngine("some/model", [99], seed=3, chunk_prompts=2)
    prompts = [Prompt([10 + i, 1], key=i) for i in range(3)]
    results = list(engine.generate(prompts, SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=8, seed=3)))
    assert [i for i, _ in results] == [0, 1, 2]
    assert results[1][1] == [Completion([11, 0], True), Completion([11, 1], True)]
    first = calls["generate"][0][1][0].kwargs
    assert first["n"] == 2 and first["stop_token_ids"] == [99] and first["max_tokens"] == 8
    assert first["seed"] == stream_seed(3, 0) and first["top_k"] == -1
    assert len(calls["generate"]) == 2  # chunks of 2 prompts
