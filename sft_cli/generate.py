"""`sft generate`: best-of-N rejection sampling and distillation data, verified, ready for `sft prepare`.

    sft generate recipe=rejection-sampling                              # the shipped MMLU + HumanEval loop
    sft generate recipe=demo gen.model=runs/demo gen.prompts=prompts.jsonl gen.n=8 gen.scorer=match
    sft generate gen.model=Qwen/Qwen3-8B gen.prompts=math.jsonl gen.extract=boxed gen.select=all_passing

For each prompt (the formats prepare reads: a `messages` row, its last assistant turn the reference
answer when present, or a prompt/completion, alpaca, sharegpt row), sample gen.n replies with the
model's chat template, stopping at the template's end-of-turn tokens; score each (verify.py: `match`
the final answer against the reference, `tests` run the row's unit tests in a sandboxed subprocess,
`reward` a reward model's score, `none` keep all); keep the best (selection.py).

Resumable: every prompt's samples are appended to all.jsonl (one write, fsynced) as soon as they are
scored; a killed run continues after its last complete prompt and generates nothing twice, and
since each sample draws from its own random stream (sampling.py) the result equals an uninterrupted
run's. Writes run_dir/generated/:

    all.jsonl       every sample: prompt, reply, reasoning, score, passed, kept and why
    timing.jsonl    seconds spent sampling each prompt (for tokens/s)
    data.jsonl      the kept replies as OpenAI `messages` rows (+ reasoning_content): a source for prepare
    rejected.jsonl  prompt rows that could not be used, with their line and reason
    report.json     pass@1 / pass@N / acceptance / lengths / distinct-n by source, tokens/s
    generation.png  the same at a glance
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sft_cli import console as ui
from sft_cli.config import GenSourceConfig, ModelConfig, SFTConfig, load_config
from sft_cli.errors import ConfigError, SFTError
from sft_cli.run_dir import (
    MANIFEST,
    fingerprint,
    is_complete,
    read_manifest,
    write_json_atomic,
    write_manifest,
)
from sft_cli.sampling import Completion, Prompt, Reply, SamplingParams, decode_reply, stop_token_ids, text_key
from sft_cli.scoring import distinct_n
from sft_cli.selection import select

OUT = "generated"
JOB = "job.json"  # the fingerprint of the samples in all.jsonl: a rerun resumes only the same job
# Sampling time per prompt, apart from all.jsonl so that file is the same whether or not a run resumed.
TIMING = "timing.jsonl"


def run(cfg: SFTConfig) -> int:
    gen = cfg.gen
    out = Path(cfg.run_dir) / OUT
    target = resolve_target(cfg)
    tokenizer = target.tokenizer()
    prompts, rejected = load_prompts(cfg, tokenizer)
    if not prompts:
        raise SFTError(f"no usable prompts: all {len(rejected)} rows rejected "
                       f"({dict(Counter(r['reason'] for r in rejected))}); see the reasons above")
    seed = cfg.seed if gen.seed is None else gen.seed
    params = SamplingParams(n=gen.n, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                            max_new_tokens=gen.max_new_tokens, seed=seed, batch_size=gen.batch_size)
    engine_name = pick_engine(gen.engine, target)
    stops = stop_token_ids(tokenizer, target.run / "prepared" if target.run else None)
    # What changes the samples or which are kept; not gen.batch_size (samples do not depend on it), so a
    # run killed for memory resumes with a smaller batch.
    sampling = {k: v for k, v in params.__dict__.items() if k != "batch_size"}
    fp = fingerprint("generate", target.identity(), [p.identity() for p in prompts], sampling, engine_name, stops,
                     cfg.max_seq_len, _scoring_settings(cfg))
    if is_complete(out, fp):
        report = json.loads((out / "report.json").read_text())
        ui.err.print(f"[green]generated/ is up to date[/] ({out}, fingerprint {fp}): {report['kept']:,} replies kept "
                     f"of {report['samples']:,} samples")
        return 0
    done = resume(out, fp, gen.overwrite, n=gen.n)
    todo = [p for p in prompts if p.id not in done]
    ui.err.print(f"generating: {target.describe()} ({engine_name}), {len(prompts):,} prompts x {gen.n} samples"
                 + (f"; resuming: {len(prompts) - len(todo):,} prompts already done" if done else ""))
    if todo:
        scorer = Scorers(cfg)
        engine = make_engine(engine_name, cfg, target, tokenizer, stops)
        _sample_and_score(engine, todo, params, tokenizer, scorer, cfg, out / "all.jsonl")
    return finish(cfg, out, fp, prompts, rejected, target, engine_name)


# -- what samples: a model folder, hub id or a run's output, with the right tokenizer ---------------

@dataclass
class Target:
    weights: str  # a folder or hub id to load
    model: ModelConfig  # base model settings (an adapter loads onto model.name_or_path)
    run: Path | None  # the training run it came from: its prepared tokenizer and chat template
    template: str | None = None  # data.chat_template to apply when there is no run

    def tokenizer(self):
        from sft_cli.data.templates import load_tokenizer

        if self.run is not None and (self.run / "prepared" / "tokenizer").is_dir():
            from sft_cli.prepare import load_prepared_tokenizer

            return load_prepared_tokenizer(self.run / "prepared")
        source = self.model.tokenizer or (self.model.name_or_path if self.is_adapter else self.weights)
        return load_tokenizer(source, self.template, self.model.trust_remote_code, self.model.revision)

    @property
    def is_adapter(self) -> bool:
        return (Path(self.weights) / "adapter_config.json").is_file()

    def identity(self) -> dict:
        """What names these weights for the resume check: the path, the size and mtime of every file in
        a local folder (a retrained run_dir/final is another model), and how they load."""
        folder = Path(self.weights)
        files = {str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns]
                 for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else {}
        model = {k: getattr(self.model, k) for k in ("name_or_path", "dtype", "attn_implementation", "revision")}
        return {"weights": str(self.weights), "files": files, "model": model}

    def run_config(self) -> SFTConfig | None:
        return load_config(str(self.run / "config.yaml")) if self.run is not None else None

    def describe(self) -> str:
        return f"{self.weights}" + (f" (adapter on {self.model.name_or_path})" if self.is_adapter else "")


def _run_of(path: Path) -> Path | None:
    """The run_dir a folder belongs to: the run itself, its final/ or merged/, or a checkpoint."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "prepared").is_dir():
            return candidate
    return None


def _run_output(run: Path) -> Path | None:
    # final/ first, as `sft evaluate` reads it (the same greedy replies); merged/ is the same model folded.
    for name in ("final", "merged"):
        if (run / name / "config.json").is_file() or (run / name / "adapter_config.json").is_file():
            return run / name
    return None


def resolve_target(cfg: SFTConfig) -> Target:
    given = cfg.gen.model
    if given is None:  # this run's own model when it has one, else the recipe's base model
        run = Path(cfg.run_dir)
        weights = _run_output(run) if (run / "config.yaml").is_file() else None
        if weights is None:
            return Target(cfg.model.name_or_path, cfg.model, None, cfg.data.chat_template)
        return Target(str(weights), load_config(str(run / "config.yaml")).model, run)
    path = Path(given)
    run = _run_of(path) if path.exists() else None
    if run is None:
        if not path.exists() and (given.startswith((".", "/", "~")) or path.suffix in (".yaml", ".json")):
            raise ConfigError("gen.model", f"not found: {given}", "give a model folder, a run_dir, or a hub id")
        model = copy.deepcopy(cfg.model)
        adapter = path / "adapter_config.json"
        if not adapter.is_file():
            model.name_or_path = given
        elif model.name_or_path in (given, "???"):  # no base named apart from the adapter: the one it was made on
            model.name_or_path = json.loads(adapter.read_text()).get("base_model_name_or_path") or model.name_or_path
        return Target(given, model, None, cfg.data.chat_template)
    weights = path if path != run else _run_output(run)
    if weights is None:
        raise ConfigError("gen.model", f"the run {run} has no final/ or merged/ model yet",
                          "train it first (sft train), or point gen.model at one of its checkpoints")
    return Target(str(weights), load_config(str(run / "config.yaml")).model, run)


def pick_engine(choice: str, target: Target) -> str:
    from sft_cli.sampling import vllm_usable

    if choice == "transformers":
        return choice
    why_not = None if vllm_usable() else "vllm needs the vllm package and a CUDA GPU"
    why_not = why_not or _vllm_cannot_load(target)
    if why_not and choice == "vllm":
        raise ConfigError("gen.engine", why_not, "set gen.engine=transformers (or auto)")
    if why_not and vllm_usable():
        ui.err.print(f"[dim]gen.engine=auto: transformers, not vllm ({why_not})[/]")
    return "transformers" if why_not else "vllm"


def _vllm_cannot_load(target: Target) -> str | None:
    from sft_cli.model import is_training_checkpoint

    folder = Path(target.weights)
    if is_training_checkpoint(folder):
        return f"{folder} is a training checkpoint; vLLM loads model folders and adapters"
    if target.is_adapter:
        adapter = json.loads((folder / "adapter_config.json").read_text())
        if adapter.get("modules_to_save") or adapter.get("use_dora"):
            return "vLLM serves LoRA adapters without modules_to_save or DoRA; merge it first (sft merge-lora)"
    return None


def make_engine(name: str, cfg: SFTConfig, target: Target, tokenizer, stops: list[int]):
    from sft_cli.sampling import TransformersEngine, VllmEngine

    if name == "vllm":
        import tempfile

        folder = tempfile.mkdtemp(prefix="sft-gen-tokenizer-")
        tokenizer.save_pretrained(folder)  # the run's chat template and added tokens, as vLLM reads them
        base = target.model.name_or_path if target.is_adapter else target.weights
        return VllmEngine(base, stops, tokenizer_path=folder, adapter_path=target.weights if target.is_adapter else None,
                          dtype=target.model.dtype if target.model.dtype != "auto" else "auto",
                          seed=cfg.seed if cfg.gen.seed is None else cfg.gen.seed, trust_remote_code=target.model.trust_remote_code,
                          # A reward model shares the GPU: leave it room.
                          gpu_memory_utilization=0.6 if _uses_reward(cfg) else 0.9)
    from sft_cli.model import load_for_inference

    # A plain model folder or hub id loads as the base (model.name_or_path is it); a run's output or an
    # adapter loads from its folder (an adapter onto model.name_or_path).
    plain = target.run is None and not target.is_adapter
    model = load_for_inference(target.model, tokenizer, None if plain else Path(target.weights),
                               run_cfg=target.run_config())
    return TransformersEngine(model, tokenizer.pad_token_id, stops)


def _uses_reward(cfg: SFTConfig) -> bool:
    if cfg.gen.prompts or not cfg.gen.sources:
        return cfg.gen.scorer == "reward"
    return any((src.scorer or cfg.gen.scorer) == "reward" for src in cfg.gen.sources)


# -- prompts ----------------------------------------------------------------------------------------

@dataclass
class PromptRow:
    source: str
    id: str  # "source#row": the prompt's identity in all.jsonl and its random stream (not the file's path,
    # so a moved or relatively named file samples the same)
    location: str  # file:line, for people
    messages: list[dict]
    reference: str | None  # the row's answer: its bare answer field, else its reference reply
    reference_is_answer: bool
    row: dict  # the raw row (unit tests live here)
    scorer: str
    extract: str
    pattern: str | None
    ids: list[int] = field(default_factory=list)
    opened: bool = False  # the generation prompt opened a reasoning block
    tools: list | None = None
    template_kwargs: dict | None = None

    def identity(self) -> list:
        return [self.id, self.ids, self.reference, self.scorer, self.extract, self.pattern]


def prompt_sources(cfg: SFTConfig) -> list[GenSourceConfig]:
    gen = cfg.gen
    if gen.prompts:
        if gen.sources:
            ui.err.print("[dim]gen.prompts is set: gen.sources of the recipe are not used[/]")
        return [GenSourceConfig(path=gen.prompts)]
    if not gen.sources:
        raise ConfigError("gen.prompts", "no prompts given", "set gen.prompts=FILE.jsonl (or gen.sources=[...])")
    return list(gen.sources)


def load_prompts(cfg: SFTConfig, tokenizer) -> tuple[list[PromptRow], list[dict]]:
    """Every usable prompt of every source, in order, and the rows that were not usable (with their
    location and reason): a row is never dropped silently."""
    import tempfile

    from sft_cli.data.sources import load_source, source_name

    chat = _chat_renderer(cfg, tokenizer)
    prompts, rejected = [], []
    sources = prompt_sources(cfg)
    with tempfile.TemporaryDirectory(prefix="sft-gen-") as work:
        for index, src in enumerate(sources):
            if cfg.gen.num_prompts is not None and len(prompts) >= cfg.gen.num_prompts:
                break  # the sources after the cap are not read at all
            name = source_name(src, index)
            key = "gen.prompts" if cfg.gen.prompts else f"gen.sources[{index}].path"
            try:
                rows = load_source(src, index, Path(work))
            except SFTError as exc:  # its message names data.sources[i]; here the prompts come from `key`
                raise SFTError(str(exc).replace(f"data.sources[{index}].path", key)) from None
            taken, before = 0, len(rejected)
            for ordinal, raw in enumerate(rows):
                if src.limit is not None and taken >= src.limit:
                    break
                if cfg.gen.num_prompts is not None and len(prompts) >= cfg.gen.num_prompts:
                    break
                try:
                    prompt = _prompt_row(raw, src, name, f"{name}#{ordinal}", cfg, tokenizer, chat)
                except _Unusable as why:
                    rejected.append({"location": raw["location"], "source": name, "reason": why.reason,
                                     "detail": why.detail})
                    continue
                prompts.append(prompt)
                taken += 1
            if not taken and len(rejected) > before:
                ui.err.print(f"[yellow]source {name}: every row read was rejected[/] (see rejected.jsonl)")
    if len({src_name for src_name in (source_name(src, i) for i, src in enumerate(sources))}) < len(sources):
        raise ConfigError("gen.sources", "two sources have the same name", "give each source its own `name`")
    if rejected:
        counts = Counter(r["reason"] for r in rejected)
        ui.err.print(f"[yellow]{len(rejected)} prompt rows not usable[/]: "
                     + ", ".join(f"{reason} {n}" for reason, n in counts.most_common())
                     + f" (first: {rejected[0]['location']}: {rejected[0]['detail'][:120]})")
    return prompts, rejected


class _Unusable(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _chat_renderer(cfg: SFTConfig, tokenizer):
    if not tokenizer.chat_template:
        return None
    from sft_cli.data.chat import ChatRenderer
    from sft_cli.data.templates import special_tokens

    markers = [t for t in tokenizer.added_tokens_encoder if len(t) > 1]
    return ChatRenderer(tokenizer.chat_template, dict(tokenizer.special_tokens_map), sorted(special_tokens(tokenizer)),
                        markers, template_kwargs=cfg.data.chat_template_kwargs)


# Prompt-only rows (no reply to learn from, so prepare has no format for them): the prompt's column.
PROMPT_COLUMNS = ("prompt", "question", "problem", "query")


def _prompt_only(row: dict, columns: dict[str, str]) -> dict | None:
    for name in PROMPT_COLUMNS:
        value = row.get(columns.get(name, name))
        if isinstance(value, str) and value.strip():
            return {"kind": "prompt_completion", "prompt": value, "completion": None}
    return None


def _prompt_row(raw: dict, src: GenSourceConfig, name: str, key: str, cfg: SFTConfig, tokenizer, chat) -> PromptRow:
    from sft_cli import verify
    from sft_cli.data.chat import OPENER
    from sft_cli.data.formats import RowError, normalize

    if raw["error"]:
        reason, _, detail = raw["error"].partition(": ")
        raise _Unusable(reason, detail)
    gen = cfg.gen
    fmt = src.format.value if hasattr(src.format, "value") else src.format
    try:
        example = normalize(raw["raw"], fmt, src.columns)
    except RowError as exc:
        example = _prompt_only(json.loads(raw["raw"]), src.columns) if exc.reason == "unknown_format" else None
        if example is None:
            raise _Unusable(exc.reason, exc.detail) from None
    row = json.loads(raw["raw"])
    if example["kind"] == "text":
        raise _Unusable("no_prompt", "a plain-text row has no prompt to answer")
    if example["kind"] == "chat":
        messages = example["messages"]
        last_prompt = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
        if last_prompt < 0 or messages[last_prompt]["role"] not in ("user", "tool"):
            raise _Unusable("no_prompt", "the conversation has no user (or tool) turn to answer")
        prompt = messages[:last_prompt + 1]
        replies = messages[last_prompt + 1:]
        reference = replies[-1].get("content") if replies else None
    else:
        prompt = [{"role": "user", "content": example["prompt"]}]
        reference = example["completion"]
    answer = row.get(gen.answer_field)
    is_answer = answer is not None and not isinstance(answer, dict | list)
    if is_answer:
        reference = str(answer)
    scorer, how = src.scorer or gen.scorer, src.extract or gen.extract
    pattern = src.pattern or gen.pattern
    if scorer == "match":
        if reference is None:
            raise _Unusable("no_reference", "scorer=match needs a reference answer (an assistant reply or "
                                            f"an '{gen.answer_field}' column)")
        if verify.reference_answer(reference, how, pattern, is_answer) is None:
            raise _Unusable("reference_unparsable", f"no {how} answer in the reference: {reference[-120:]!r}")
    if scorer == "tests" and verify.tests_program(row) is None:
        raise _Unusable("no_tests", "scorer=tests needs unit tests (test + entry_point, test_list, or tests)")
    tools, kwargs = example.get("tools"), example.get("template_kwargs")
    if chat is None:
        if example["kind"] == "chat":
            raise _Unusable("no_chat_template", "the model has no chat template; set data.chat_template")
        ids = tokenizer(example["prompt"]).input_ids  # a base model continues the raw prompt
        opened = False
    else:
        try:
            text = chat.render(chat.for_template(prompt, Counter()), True, tools, kwargs)
        except RowError as exc:
            raise _Unusable(exc.reason, exc.detail) from None
        ids = tokenizer(text, add_special_tokens=False).input_ids
        opened = bool(OPENER.search(text))
    if len(ids) >= cfg.max_seq_len:  # its reply could never be trained within max_seq_len
        raise _Unusable("prompt_too_long", f"{len(ids)} tokens >= max_seq_len {cfg.max_seq_len}")
    return PromptRow(source=name, id=key, location=raw["location"], messages=prompt, reference=reference,
                     reference_is_answer=is_answer, row=row, scorer=scorer, extract=how, pattern=pattern, ids=ids,
                     opened=opened, tools=tools, template_kwargs=kwargs)


# -- scoring ----------------------------------------------------------------------------------------

def _scoring_settings(cfg: SFTConfig) -> dict:
    gen = cfg.gen
    return {k: getattr(gen, k) for k in ("scorer", "extract", "pattern", "answer_field", "reward_model", "test_timeout_s",
                                         "test_memory_mb", "select", "select_k", "min_score", "dedupe",
                                         "keep_truncated")}


class Scorers:
    """Scores one prompt's replies with its source's scorer; the reward model loads on first use."""

    def __init__(self, cfg: SFTConfig):
        self.cfg, self._reward = cfg, None

    def __call__(self, prompt: PromptRow, replies: list[Reply]):
        from sft_cli import verify

        gen = self.cfg.gen
        if prompt.scorer == "none":
            return [verify.Verdict(None, True, "unscored") for _ in replies]
        if prompt.scorer == "match":
            return [verify.score_match(r.content, prompt.reference, prompt.extract, prompt.pattern,
                                       reference_is_answer=prompt.reference_is_answer) for r in replies]
        if prompt.scorer == "tests":
            tests = verify.tests_program(prompt.row)
            stub = prompt.row.get("prompt") if isinstance(prompt.row.get("prompt"), str) else None
            codes = [verify.code_from_reply(r.content, stub, prompt.row.get("entry_point")) for r in replies]
            runnable = [i for i, code in enumerate(codes) if code]
            verdicts = verify.run_sandboxed_many([codes[i] + "\n\n" + tests for i in runnable],
                                                 timeout_s=gen.test_timeout_s, memory_mb=gen.test_memory_mb,
                                                 workers=gen.test_workers)
            by_index = dict(zip(runnable, verdicts))
            return [by_index.get(i, verify.Verdict(0.0, False, "no_code")) for i in range(len(replies))]
        if self._reward is None:
            from sft_cli import distributed

            self._reward = verify.RewardModel(gen.reward_model, device=str(distributed.device()),
                                              batch_size=gen.reward_batch_size,
                                              trust_remote_code=self.cfg.model.trust_remote_code)
        scores = self._reward.score([prompt.messages + [_assistant(r)] for r in replies])
        return [verify.Verdict(float(s), True, "ok") for s in scores]


def _assistant(reply: Reply) -> dict:
    message = {"role": "assistant", "content": reply.content}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    return message


# -- the loop: sample, score, select, append ----------------------------------------------------------

def _sample_and_score(engine, todo: list[PromptRow], params: SamplingParams, tokenizer, scorer: Scorers,
                      cfg: SFTConfig, path: Path) -> None:
    from sft_cli.faults import fault_point

    gen = cfg.gen
    prompts = [Prompt(p.ids, text_key(p.id)) for p in todo]
    path.parent.mkdir(parents=True, exist_ok=True)
    progress = ui.counted_bar("prompts")
    tokens, seconds = 0, 0.0
    with progress, open(path, "ab") as log, open(path.with_name(TIMING), "a") as timing:
        task = progress.add_task("generate", total=len(todo), stats="")
        results = engine.generate(prompts, params)
        done = 0
        while True:
            started = time.perf_counter()
            item = next(results, None)
            elapsed = time.perf_counter() - started  # this prompt's share of the sampling time
            if item is None:
                break
            i, completions = item
            lines = _score_prompt(todo[i], completions, tokenizer, scorer, gen, cfg.max_seq_len)
            new_tokens = sum(len(c.token_ids) for c in completions)
            timing.write(json.dumps({"id": todo[i].id, "seconds": elapsed, "tokens": new_tokens}) + "\n")
            timing.flush()
            log.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode())
            log.flush()
            os.fsync(log.fileno())  # a prompt is either wholly in all.jsonl or not at all
            done += 1
            fault_point("generate", done)  # reliability tests: a kill after `done` prompts
            tokens += new_tokens
            seconds += elapsed
            progress.update(task, completed=done, stats=f"{tokens / max(seconds, 1e-9):,.0f} tok/s  "
                                                        f"kept {sum(line['kept'] for line in lines)}/{len(lines)}")


def _score_prompt(prompt: PromptRow, completions: list[Completion], tokenizer, scorer: Scorers, gen,
                  max_seq_len: int) -> list[dict]:
    replies = [decode_reply(tokenizer, c.token_ids, prompt.opened) for c in completions]
    verdicts = scorer(prompt, replies)
    # Kept replies become training examples: prompt + reply + its end token (and the template's newline
    # after it) must fit max_seq_len, or prepare would drop them as overlong.
    samples = [{"score": v.score, "passed": v.passed, "stopped": c.stopped, "content": r.content,
                "reasoning": r.reasoning, "tokens": len(c.token_ids),
                "fits": len(prompt.ids) + len(c.token_ids) + 2 <= max_seq_len}
               for r, c, v in zip(replies, completions, verdicts)]
    decisions = select(samples, gen.select, gen.select_k, gen.min_score, gen.dedupe, gen.keep_truncated)
    lines = []
    for s, (reply, completion, verdict, decision) in enumerate(zip(replies, completions, verdicts, decisions)):
        line = {"id": prompt.id, "location": prompt.location, "source": prompt.source, "sample": s,
                "messages": prompt.messages,
                "content": reply.content, "reasoning_content": reply.reasoning, "new_tokens": len(completion.token_ids),
                "stopped": completion.stopped, "score": verdict.score, "passed": verdict.passed,
                "verdict": verdict.reason, "detail": verdict.detail, "kept": decision.kept, "why": decision.why,
                "scorer": prompt.scorer, "reference": prompt.reference}
        if prompt.tools:
            line["tools"] = prompt.tools
        if prompt.template_kwargs:
            line["chat_template_kwargs"] = prompt.template_kwargs
        lines.append(line)
    return lines


# -- resume -----------------------------------------------------------------------------------------

def resume(out: Path, fp: str, overwrite: bool, n: int) -> set[str]:
    """The prompts all.jsonl already holds whole (n samples each). A torn tail (a kill mid-write, a
    full disk) is cut off; samples of another job are refused unless gen.overwrite."""
    import shutil

    job = out / JOB
    log = out / "all.jsonl"
    if job.is_file():
        previous = json.loads(job.read_text()).get("fingerprint")
        if previous != fp:
            if not overwrite:
                raise ConfigError("gen.overwrite", f"{out} holds samples of a different model, prompt set or "
                                                   "gen.* settings", "use another run_dir, or set gen.overwrite=true "
                                                                     "to discard them")
            shutil.rmtree(out)
    elif out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if read_manifest(out) is not None:  # finished before under another fingerprint: outputs are stale
        (out / MANIFEST).unlink(missing_ok=True)
    write_json_atomic(job, {"fingerprint": fp})
    if not log.is_file():
        return set()
    done, counts, good_end = set(), Counter(), 0
    with open(log, "rb") as handle:
        data = handle.read()
    offset = 0
    for raw in data.split(b"\n")[:-1]:  # the piece after the last newline is a torn line, or empty
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            break
        offset += len(raw) + 1
        counts[line["id"]] += 1
        if counts[line["id"]] == n:
            done.add(line["id"])
            good_end = offset
    if good_end < len(data):
        with open(log, "r+b") as handle:
            handle.truncate(good_end)
    return done


# -- outputs ----------------------------------------------------------------------------------------

def finish(cfg: SFTConfig, out: Path, fp: str, prompts: list[PromptRow], rejected: list[dict], target: Target,
           engine: str) -> int:
    order = {p.id: i for i, p in enumerate(prompts)}
    lines = _read_jsonl(out / "all.jsonl")
    lines = sorted((line for line in lines if line["id"] in order), key=lambda line: (order[line["id"]], line["sample"]))
    _write_jsonl(out / "all.jsonl", lines)  # in prompt order, only this job's prompts
    _write_jsonl(out / "data.jsonl", [_training_row(line) for line in lines if line["kept"]])
    _write_jsonl(out / "rejected.jsonl", rejected)
    report = build_report(lines, prompts, rejected, cfg, target, engine, out)
    write_json_atomic(out / "report.json", report)
    from sft_cli.plot import generation

    generation(report, out / "generation.png")
    write_manifest(out, fp, {"stage": "generate", "kept": report["kept"]})
    ui.print_generation_report(report, out)
    return 0


def _training_row(line: dict) -> dict:
    reply = {"role": "assistant", "content": line["content"]}
    if line.get("reasoning_content"):
        reply["reasoning_content"] = line["reasoning_content"]
    row = {"messages": line["messages"] + [reply], "source": line["source"], "score": line["score"]}
    for key in ("tools", "chat_template_kwargs"):
        if line.get(key):
            row[key] = line[key]
    return row


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _stats(lines: list[dict], n: int) -> dict:
    by_prompt: dict[str, list[dict]] = {}
    for line in lines:
        by_prompt.setdefault(line["id"], []).append(line)
    kept = [line for line in lines if line["kept"]]
    # pass@k: only where a verdict is right/wrong (match, tests); a reward score has no pass/fail.
    verified = {key: group for key, group in by_prompt.items() if group[0]["scorer"] in ("match", "tests")}
    text = [((line["reasoning_content"] or "") + " " + line["content"]).split() for line in lines]
    kept_text = [((line["reasoning_content"] or "") + " " + line["content"]).split() for line in kept]
    scores = [line["score"] for line in lines if line["score"] is not None]
    return {
        "scorer": lines[0]["scorer"] if lines else None,
        "prompts": len(by_prompt), "samples": len(lines), "kept": len(kept),
        "prompts_with_kept": sum(any(line["kept"] for line in group) for group in by_prompt.values()),
        # pass@1: the chance one sample passes (mean pass rate per prompt); pass@N: any of the N does.
        "pass@1": float(np.mean([np.mean([line["passed"] for line in g]) for g in verified.values()])) if verified else None,
        f"pass@{n}": float(np.mean([any(line["passed"] for line in g) for g in verified.values()])) if verified else None,
        "acceptance": len(kept) / max(len(lines), 1),
        "mean_score": float(np.mean(scores)) if scores else None,
        "truncated": sum(not line["stopped"] for line in lines) / max(len(lines), 1),
        "mean_tokens": float(np.mean([line["new_tokens"] for line in lines])) if lines else 0.0,
        "mean_tokens_kept": float(np.mean([line["new_tokens"] for line in kept])) if kept else 0.0,
        "distinct_1": distinct_n(text, 1), "distinct_2": distinct_n(text, 2),
        "distinct_1_kept": distinct_n(kept_text, 1), "distinct_2_kept": distinct_n(kept_text, 2),
        "why": dict(Counter(line["why"] for line in lines).most_common()),
        "verdicts": dict(Counter(line["verdict"] for line in lines).most_common()),
    }


def _sampling_seconds(out: Path) -> dict[str, float]:
    """Seconds spent sampling each prompt, over every (resumed) invocation; the last entry of a prompt
    counts (a prompt sampled again after a kill tore its lines)."""
    path = out / TIMING
    return {entry["id"]: entry["seconds"] for entry in (_read_jsonl(path) if path.is_file() else [])}


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file we wrote, split on newlines only: str.splitlines would also split inside a
    reply holding U+2028 or U+0085, which json.dumps(ensure_ascii=False) writes as they are. A torn
    last line (a kill mid-write) is skipped."""
    rows = []
    for raw in path.read_bytes().split(b"\n"):
        if raw.strip():
            try:
                rows.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return rows


def build_report(lines: list[dict], prompts: list[PromptRow], rejected: list[dict], cfg: SFTConfig, target: Target,
                 engine: str, out: Path) -> dict:
    gen = cfg.gen
    sources = list(dict.fromkeys(p.source for p in prompts))
    seconds = sum(_sampling_seconds(out).get(p.id, 0.0) for p in prompts)
    tokens = sum(line["new_tokens"] for line in lines)
    overall = _stats(lines, gen.n)
    if len({p.scorer for p in prompts}) > 1:
        overall["scorer"] = "mixed"
    report = {
        "model": target.describe(), "engine": engine, "n": gen.n, "temperature": gen.temperature, "top_p": gen.top_p,
        "top_k": gen.top_k, "max_new_tokens": gen.max_new_tokens, "select": gen.select,
        "prompts": len(prompts), "samples": len(lines), "kept": overall["kept"],
        "rejected_rows": len(rejected), "rejected_reasons": dict(Counter(r["reason"] for r in rejected)),
        "overall": overall,
        "by_source": {name: _stats([line for line in lines if line["source"] == name], gen.n) for name in sources},
        "new_tokens": tokens, "generation_s": seconds, "tokens_per_s": tokens / seconds if seconds else None,
    }
    if overall["kept"] and overall["distinct_2_kept"] < 0.8 * overall["distinct_2"]:
        report["warning"] = (f"kept replies are less diverse than all samples (distinct-2 {overall['distinct_2_kept']:.3f} "
                             f"vs {overall['distinct_2']:.3f}): rejection sampling narrows what the model says")
    return report
