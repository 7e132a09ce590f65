"""Generation speed of `sft generate`'s transformers engine on CPU: batched vs one prompt at a time.

The demo model (SmolLM2-135M-Instruct, float32, sdpa) samples gen.n replies to MMLU chain-of-thought
prompts (the shipped data, as recipes/rejection-sampling.yaml does) with the engine `sft generate`
runs (sampling.TransformersEngine: left-padded batches, KV cache, per-sample seeded streams), at three
batch sizes: 1 sequence per generate call, one prompt's n samples per call, and all of them in one
call. A fourth row is plain `model.generate(do_sample=True, num_return_sequences=n)` per prompt: what
the seeded streams cost next to torch's one global generator. tokens/s counts the replies' own tokens
(up to and without their stop token), not the padding a finished row carries in its batch.

    python -m bench.generate [--prompts 8] [--n 4] [--max-new-tokens 128]   (make bench-generate)

Results go to the "## generate" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from bench.common import machine, markdown, print_table, write_section


def load(prompts: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_cli.assets import asset_path, resolve_model
    from sft_cli.sampling import stop_token_ids

    path = resolve_model("builtin:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    lines = Path(asset_path("data/mmlu_cot.jsonl")).read_text().splitlines()[:prompts]
    rows = [json.loads(line) for line in lines]
    ids = [tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"] for row in rows]
    return model, tokenizer, ids, stop_token_ids(tokenizer)


def ours(model, tokenizer, ids, stops, n: int, max_new_tokens: int, batch_size: int) -> tuple[float, int]:
    from sft_cli.sampling import Prompt, SamplingParams, TransformersEngine

    engine = TransformersEngine(model, tokenizer.pad_token_id, stops)
    params = SamplingParams(n=n, temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens, seed=0,
                            batch_size=batch_size)
    start = time.perf_counter()
    tokens = sum(len(c.token_ids) for _, completions in engine.generate([Prompt(p, i) for i, p in enumerate(ids)],
                                                                        params) for c in completions)
    return time.perf_counter() - start, tokens


def plain_hf(model, tokenizer, ids, stops, n: int, max_new_tokens: int) -> tuple[float, int]:
    torch.manual_seed(0)
    start, tokens = time.perf_counter(), 0
    with torch.no_grad():
        for prompt in ids:
            batch = torch.tensor([prompt])
            out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, temperature=0.8,
                                 top_p=0.95, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)[:, len(prompt):].tolist()
            for row in out:
                stop = next((i for i, t in enumerate(row) if t in stops), len(row))
                tokens += stop
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    console = Console()
    model, tokenizer, ids, stops = load(args.prompts)
    ours(model, tokenizer, ids[:1], stops, 1, 8, 1)  # warm-up: first-call allocations out of the timings
    sequences = args.prompts * args.n
    runs = [("one sequence at a time", 1), ("one prompt at a time", args.n), ("batched", sequences)]
    rows, speeds = [], {}
    for label, batch_size in runs:
        seconds, tokens = ours(model, tokenizer, ids, stops, args.n, args.max_new_tokens, batch_size)
        speeds[label] = tokens / seconds
        rows.append([f"sft generate ({label})", str(batch_size), f"{seconds:.1f}", f"{tokens:,}",
                     f"{tokens / seconds:,.1f}"])
        console.print(rows[-1])
    seconds, tokens = plain_hf(model, tokenizer, ids, stops, args.n, args.max_new_tokens)
    rows.append(["model.generate(do_sample, num_return_sequences=n) per prompt", str(args.n), f"{seconds:.1f}",
                 f"{tokens:,}", f"{tokens / seconds:,.1f}"])
    header = ["engine", "sequences per call", "wall s", "reply tokens", "tokens/s"]
    print_table(console, "sft generate: tokens/s on CPU", header, rows, left=("engine",))
    ratio = speeds["batched"] / speeds["one prompt at a time"]
    body = f"""## generate

Generation speed of `sft generate`'s transformers engine on CPU (`sampling.TransformersEngine`), demo model
SmolLM2-135M-Instruct in float32 (sdpa, KV cache), {args.prompts} MMLU chain-of-thought prompts from the shipped
data x n={args.n} samples, temperature 0.8, top_p 0.95, max_new_tokens {args.max_new_tokens}. tokens/s counts the
replies' own tokens (up to their stop token). The last row is plain `model.generate(do_sample=True)` with
`num_return_sequences=n`, one prompt per call: the same work as "one prompt at a time" with torch's global
generator instead of the per-sample seeded streams. One run each, one process, after a warm-up call.
Our three rows draw the same replies (each sample has its own stream, whatever the batch), so their reply
tokens agree; the plain row draws other samples, of other lengths, so its tokens/s is comparable but its
token count is not.

{markdown(header, rows)}

Batched vs one prompt at a time: {ratio:.2f}x tokens/s; vs one sequence at a time: {speeds['batched'] / speeds['one sequence at a time']:.2f}x.

Command: `python -m bench.generate --prompts {args.prompts} --n {args.n} --max-new-tokens {args.max_new_tokens}`
(`make bench-generate`).

Machine: {machine(("torch", "transformers"), torch_threads=True, load=True)}
"""
    write_section("generate", body)
    console.print(f"batched / one prompt at a time: {ratio:.2f}x; written to BENCHMARKS.md")


if __name__ == "__main__":
    main()
