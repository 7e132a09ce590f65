"""Sampling replies from a causal LM: the engines behind `sft generate` and `sft evaluate`'s replies.

Two engines, one contract: `engine.generate(prompts, params)` yields `(i, [Completion] * params.n)`
for each prompt in input order, as soon as all of its samples are done, so a caller can persist
results per prompt and resume after a crash.

    transformers   batched `model.generate` (left padding, KV cache), CPU or GPU
    vllm           vLLM's LLM.generate, when installed and a GPU is present (gen.engine=auto picks it)

Seeded per sample, not per batch: each sample draws from its own random stream, keyed by
(seed, prompt key, sample index, step), through the Gumbel-max trick (argmax of logits/T + Gumbel
noise is a draw from softmax(logits/T), after top-k/top-p masking). So a sample does not depend on
which other prompts share its batch, on the batch size, or on where a killed run resumed; with
torch's one global generator it would. That holds bit for bit where logits do not depend on the batch
shape (CPU, float32); a GPU kernel may round a padded batch's logits differently, and then a near-tie
can flip. temperature=0 is greedy decoding.

    engine = TransformersEngine(model, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id])
    params = SamplingParams(n=4, temperature=0.8, top_p=0.95, max_new_tokens=256, seed=0)
    for i, completions in engine.generate([Prompt(ids, key=7)], params):
        print(i, [decode_reply(tok, c.token_ids) for c in completions])
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128
    seed: int = 0
    batch_size: int = 32  # sequences per model.generate call (transformers)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    key: int  # identifies the prompt in the random streams: stable across runs (e.g. its file and line)


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # the reply without its stop token
    stopped: bool  # ended on a stop token (False: cut at max_new_tokens)


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers: independent streams for (seed, prompt, sample, step)."""
    blob = b"".join(int(p).to_bytes(8, "little", signed=False) for p in parts)
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


def text_key(text: str) -> int:
    """A stable integer key for a prompt's identity (e.g. 'file.jsonl:12')."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def cut_at_stop(ids: list[int], stop_ids: set[int]) -> Completion:
    at = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    return Completion(list(ids[:at]) if at is not None else list(ids), at is not None)


class TopP:
    """Nucleus filter: keep the smallest set of likeliest tokens whose probabilities sum to >= p (the
    set transformers' TopPLogitsWarper keeps). Found among the `probe` likeliest tokens when they
    already hold p, which is nearly always, instead of sorting the whole vocabulary every step (a full
    sort of 18 x 49k scores costs ~45 ms on 2 CPU cores, a quarter of a SmolLM2 decode step); rows whose
    nucleus is wider than `probe` are sorted in full."""

    def __init__(self, p: float, probe: int = 256):
        self.p, self.probe = p, probe

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.float().softmax(-1)
        remove = torch.ones_like(scores, dtype=torch.bool)
        top, index = probs.topk(min(self.probe, scores.shape[-1]), dim=-1)  # sorted, likeliest first
        wide = top.sum(-1) < self.p
        if wide.any():
            rows = wide.nonzero().squeeze(1)
            self._mark(remove, rows, *probs[rows].sort(dim=-1, descending=True))
        narrow = (~wide).nonzero().squeeze(1)
        self._mark(remove, narrow, top[narrow], index[narrow])
        return scores.masked_fill(remove, -float("inf"))

    def _mark(self, remove: torch.Tensor, rows: torch.Tensor, top: torch.Tensor, index: torch.Tensor) -> None:
        # A token stays when the tokens likelier than it hold less than p (so the likeliest always stays).
        before = top.cumsum(-1) - top
        remove[rows.unsqueeze(1), index] = before >= self.p


class SeededGumbel:
    """Logits processor: adds Gumbel noise drawn from each row's own stream, so greedy decoding
    after it samples. Rows are sequences; `keys[r]` names row r's stream; the step is the number of
    tokens generated so far (the prompt is left-padded to `prompt_width`)."""

    def __init__(self, keys: list[int], prompt_width: int):
        self.keys, self.prompt_width = keys, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        noise = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        tiny = torch.finfo(torch.float32).tiny
        for row, key in enumerate(self.keys):
            stream = torch.Generator(device=scores.device).manual_seed(stream_seed(key, step))
            torch.rand(scores.shape[1], generator=stream, device=scores.device, out=noise[row])
        noise.clamp_(min=tiny, max=1.0 - 1e-7)
        return scores.float() - torch.log(-torch.log(noise))  # -inf (masked) stays -inf


class TransformersEngine:
    """Batched `model.generate`: prompts x samples as rows, `params.batch_size` rows per call."""

    name = "transformers"

    def __init__(self, model, pad_id: int | None, stop_ids: list[int]):
        self.model, self.stop_ids = model, list(stop_ids)
        self.pad_id = pad_id if pad_id is not None else self.stop_ids[0]

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> Iterator[tuple[int, list[Completion]]]:
        rows = [(i, s) for i in range(len(prompts)) for s in range(params.n)]
        done: dict[int, list[Completion]] = {}
        next_out = 0
        for lo in range(0, len(rows), params.batch_size):
            chunk = rows[lo:lo + params.batch_size]
            outputs = self._batch([prompts[i] for i, _ in chunk], [s for _, s in chunk], params)
            for (i, _), completion in zip(chunk, outputs):
                done.setdefault(i, []).append(completion)
            while next_out in done and len(done[next_out]) == params.n:
                yield next_out, done.pop(next_out)
                next_out += 1

    @torch.no_grad()
    def _batch(self, prompts: list[Prompt], samples: list[int], params: SamplingParams) -> list[Completion]:
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

        device = next(self.model.parameters()).device
        width = max(len(p.ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids[r, width - len(p.ids):] = torch.tensor(p.ids)
            mask[r, width - len(p.ids):] = 1
        processors = LogitsProcessorList()
        if params.temperature > 0:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopP(params.top_p))
            keys = [stream_seed(params.seed, p.key, s) for p, s in zip(prompts, samples)]
            processors.append(SeededGumbel(keys, width))
        # Greedy over (noised) scores: do_sample stays off, so the model's own sampling defaults
        # (generation_config.top_k=50 and the like) never apply on top of gen.*.
        # Neutral values set explicitly: generate() fills every unset field from the model's own
        # generation_config (Qwen2.5 ships repetition_penalty 1.05), which would bend gen.* and differ
        # from the vLLM engine.
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=self.stop_ids, pad_token_id=self.pad_id, use_cache=True,
                                  repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, min_length=0,
                                  encoder_repetition_penalty=1.0, suppress_tokens=[], begin_suppress_tokens=[])
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                  logits_processor=processors)
        stops = set(self.stop_ids)
        return [cut_at_stop(row, stops) for row in out[:, width:].tolist()]


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class VllmEngine:
    """vLLM: continuous batching on a GPU. Each prompt's samples come from its own seed, so a rerun
    reproduces them (on the same GPU and vLLM version), but they are not token-equal to the
    transformers engine's."""

    name = "vllm"

    def __init__(self, model_path: str, stop_ids: list[int], *, tokenizer_path: str | None = None,
                 adapter_path: str | None = None, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 trust_remote_code: bool = False, chunk_prompts: int = 256, gpu_memory_utilization: float = 0.9):
        from vllm import LLM

        self.stop_ids, self.chunk_prompts = list(stop_ids), chunk_prompts
        self.adapter = None
        kwargs = {"model": model_path, "tokenizer": tokenizer_path or model_path, "dtype": dtype, "seed": seed,
                  "trust_remote_code": trust_remote_code, "gpu_memory_utilization": gpu_memory_utilization}
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if adapter_path:
            import json
            from pathlib import Path

            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(adapter_path) / "adapter_config.json").read_text()).get("r", 16)
            # vLLM accepts only these ranks as its LoRA slot size; the adapter's rank must fit in one.
            slot = next((r for r in VLLM_LORA_RANKS if r >= int(rank)), VLLM_LORA_RANKS[-1])
            kwargs.update(enable_lora=True, max_lora_rank=slot)
            self.adapter = LoRARequest("sft-adapter", 1, str(adapter_path))
        self.llm = LLM(**kwargs)

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> Iterator[tuple[int, list[Completion]]]:
        from vllm import SamplingParams as VllmParams

        stops = set(self.stop_ids)
        for lo in range(0, len(prompts), self.chunk_prompts):
            chunk = prompts[lo:lo + self.chunk_prompts]
            sampling = [VllmParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                   top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                                   seed=stream_seed(params.seed, p.key) if params.temperature > 0 else None,
                                   stop_token_ids=self.stop_ids, skip_special_tokens=False) for p in chunk]
            outputs = self.llm.generate([{"prompt_token_ids": p.ids} for p in chunk], sampling,
                                        lora_request=self.adapter, use_tqdm=False)
            for j, out in enumerate(outputs):
                completions = []
                for sample in out.outputs:
                    cut = cut_at_stop(list(sample.token_ids), stops)
                    completions.append(Completion(cut.token_ids, cut.stopped or sample.finish_reason == "stop"))
                yield lo + j, completions


def stop_token_ids(tokenizer, prepared=None) -> list[int]:
    """The ids that end a generated turn: the end-of-turn tokens a run was trained on (prepared/
    report.json), the chat template's own stop tokens, and EOS. gpt-oss's `<|end|>` is not one: it
    closes the analysis message inside a reply, which ends at `<|return|>` or `<|call|>`."""
    import json
    from pathlib import Path

    from sft_cli.data.chat import ChatRenderer
    from sft_cli.data.templates import special_tokens

    ids = {tokenizer.eos_token_id} - {None}
    report = Path(prepared) / "report.json" if prepared else None
    if report is not None and report.is_file():
        ids |= set(json.loads(report.read_text()).get("eot_token_ids", []))
    template = tokenizer.chat_template
    if template:
        chat = ChatRenderer(template, dict(tokenizer.special_tokens_map), sorted(special_tokens(tokenizer)))
        ids |= {tokenizer.convert_tokens_to_ids(t) for t in chat.stop_tokens()} - {None, tokenizer.unk_token_id}
        if "<|channel|>" in template and "<|return|>" in template:
            ids -= {tokenizer.convert_tokens_to_ids("<|end|>")}
    return sorted(ids)


def vllm_usable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


# -- replies as messages ---------------------------------------------------------------------

THINK_CLOSE = re.compile(r"</(think|thinking|thought|reasoning)>")
THINK_OPEN = re.compile(r"^\s*<(think|thinking|thought|reasoning)>")
# gpt-oss (harmony): reasoning on the analysis channel, the answer on the final channel.
HARMONY_ANALYSIS = re.compile(r"<\|channel\|>analysis<\|message\|>(.*?)<\|end\|>", re.DOTALL)
HARMONY_FINAL = re.compile(r"<\|channel\|>final<\|message\|>(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Reply:
    content: str
    reasoning: str | None  # None: the reply has no reasoning block


def decode_reply(tokenizer, token_ids: list[int], opened: bool = False) -> Reply:
    """A generated reply as message fields: content, and reasoning split off as `reasoning_content`.

    `opened`: the generation prompt ended inside a reasoning block (`<think>\\n`: Qwen3.5 thinking,
    DeepSeek-R1 distills), so the reply starts with reasoning and closes it with `</think>`. Otherwise a
    reply that opens a block itself (Qwen3) or speaks on harmony channels (gpt-oss) is split the same
    way. A reply that never closes its reasoning has empty content. Without any of these, the content is
    `decode(skip_special_tokens=True)`, exactly what `sft evaluate` shows.
    """
    raw = tokenizer.decode(token_ids, skip_special_tokens=False)
    if "<|channel|>" in raw:
        final = HARMONY_FINAL.search(raw)
        reasoning = "\n".join(m.strip() for m in HARMONY_ANALYSIS.findall(raw)) or None
        content = final.group(1) if final else ""
        return Reply(_strip_specials(tokenizer, content), reasoning and _strip_specials(tokenizer, reasoning))
    if opened or THINK_OPEN.match(raw):
        body = THINK_OPEN.sub("", raw, count=1)
        close = THINK_CLOSE.search(body)
        reasoning, content = (body[:close.start()], body[close.end():]) if close else (body, "")
        return Reply(_strip_specials(tokenizer, content), _strip_specials(tokenizer, reasoning))
    return Reply(tokenizer.decode(token_ids, skip_special_tokens=True).strip(), None)


def _strip_specials(tokenizer, text: str) -> str:
    for token in sorted(tokenizer.all_special_tokens, key=len, reverse=True):
        text = text.replace(token, "")
    return text.strip()
