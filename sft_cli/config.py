"""The one config schema every verb reads, as typed dataclasses.

Defaults live here and only here; each field's docstring is the documentation
(`sft VERB --help` shows the composed result). Hydra registers these classes in
its ConfigStore with struct mode on, so an unknown key or a wrong type is an
error that names the key before any work starts; `validate(cfg)` then checks
every value with a constrained domain (ranges, choices), also before any work.

    >>> from sft_cli.config import SFTConfig
    >>> SFTConfig().data.loss_on
    <LossOn.assistant: 'assistant'>
"""

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sft_cli.errors import ConfigError

# The allowed values of every plain-string field, owned here: the modules that act on a value import
# its list from here (precision.DTYPES maps these names to torch dtypes, schedule.SCHEDULES to
# functions), so validate() checks them with nothing else loaded and no module checks them again.
# Fields with a fixed set of values that need no code (loss_on, reasoning_*, ...) are Enums below.
DTYPES = ("float32", "bfloat16", "float16")  # model.dtype, or auto
# model.attn_implementation, or auto: the backends that keep packed examples apart given restarting
# position_ids (see data/collate.py); whether one runs on this machine is model.pick_attention's call.
ATTENTION_BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
PACK_STRATEGIES = ("bfd", "wrapped", "none")  # pack.strategy (pack.py)
SCHEDULES = ("cosine", "linear", "constant")  # optim.schedule (schedule.py)
PEFT_METHODS = ("lora", "none")
RESUME_MODES = ("auto", "never")
PARALLEL_STRATEGIES = ("auto", "ddp", "fsdp")
GEN_ENGINES = ("auto", "transformers", "vllm")  # gen.engine (sampling.py)
GEN_SCORERS = ("match", "tests", "reward", "none")  # gen.scorer (verify.py)
GEN_EXTRACTORS = ("letter", "number", "boxed", "regex", "exact")  # gen.extract (verify.EXTRACTORS)
GEN_SELECTIONS = ("best", "all_passing", "top_k")  # gen.select (selection.py)
# trainer.report_to: experiment trackers (trackers.py), each with the package it needs installed.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# merge.max_shard_size: a number and a unit, as huggingface_hub parses it (500MB, 2GB).
SHARD_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*[KMGT]B\s*$", re.IGNORECASE)
MIN_SEQ_LEN = 8  # shorter rows cannot hold a chat template's markers
MAX_SEQ_LEN = 2**31 - 1  # token counts are stored as int32 (data/render.py OUTPUT_FEATURES)
MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy seed sequences take non-negative 64-bit ints


class LossOn(str, Enum):
    assistant = "assistant"  # every assistant turn (+ its end-of-turn token)
    last_assistant = "last_assistant"  # only the final assistant turn
    completion = "completion"  # the completion of prompt/completion rows; assistant turns of chats
    all = "all"  # every token


class Overlong(str, Enum):
    drop = "drop"
    truncate = "truncate"


# Functional form because `raise` is a keyword; OmegaConf matches members by name.
OnError = Enum("OnError", {"skip": "skip", "raise": "raise"}, type=str)


class Format(str, Enum):
    auto = "auto"
    messages = "messages"  # OpenAI: {"messages": [{"role", "content"}]}
    sharegpt = "sharegpt"  # {"conversations": [{"from", "value"}]}
    alpaca = "alpaca"  # instruction / input / output
    prompt_completion = "prompt_completion"  # prompt / completion
    text = "text"  # plain text, loss on every token


class ReasoningTurns(str, Enum):
    all = "all"  # every assistant turn with reasoning is trained with it (own example where history drops it)
    last = "last"  # reasoning trained only where the full conversation renders it


class ReasoningFormat(str, Enum):
    inline = "inline"  # templates without a place for reasoning: <think>...</think> before the answer
    drop = "drop"  # such templates: train the answers only (counted)


class FileType(str, Enum):
    auto = "auto"  # from the suffix (.jsonl .ndjson .json .parquet .csv), else sniffed from the content
    jsonl = "jsonl"  # one JSON object per line
    json = "json"  # one JSON document: a list of rows, one row, or an object wrapping the rows
    parquet = "parquet"
    csv = "csv"  # a header line, then one row per line


class Split(str, Enum):
    train = "train"  # split by data.eval_fraction
    eval = "eval"  # the whole source is evaluation data


@dataclass
class SourceConfig:
    path: str = "???"
    """Local file, glob, folder written by `datasets.save_to_disk`, or a hub dataset id."""
    type: FileType = FileType.auto
    """File type of local files: auto (suffix, else content) | jsonl | json | parquet | csv.
    Files may be compressed (.gz .bz2 .xz .zst) whatever the type."""
    format: Format = Format.auto
    """Row format; `auto` detects it from the columns of each row."""
    weight: float | None = None
    """Share of the training mix, relative to the other sources' weights (0.9 and 0.1 = 90/10).
    null on every source = each example once (natural shares). Set it on all sources or none."""
    split: Split = Split.train
    """`eval` makes the whole source evaluation data (no eval_fraction split from it)."""
    name: str | None = None
    """Label used in reports and the `source` column (default: the file name)."""
    hub_split: str = "train"
    """Split to read when `path` is a hub dataset id, a DatasetDict folder, or a .json file holding one
    object with several lists of rows ({train: [...], test: [...]})."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map our column names to yours, e.g. {messages: dialog, prompt: question}."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Raw data to prepare; mixed by `weight`."""
    chat_template: str | None = None
    """null = the tokenizer's own; a built-in name (chatml, llama3, zephyr); or a .jinja path."""
    loss_on: LossOn = LossOn.assistant
    """Which tokens carry loss: assistant | last_assistant | completion | all."""
    overlong: Overlong = Overlong.drop
    """Examples longer than max_seq_len: drop them or truncate them."""
    eval_fraction: float = 0.0
    """Fraction of each train source held out for evaluation (deterministic from seed)."""
    on_error: OnError = OnError.skip
    """Bad rows: skip (count, report, write to rejected.jsonl) or raise at the first one."""
    dedupe: bool = True
    """Drop exact duplicate examples (same normalised conversation), keeping the first."""
    num_proc: int | None = None
    """Worker processes for tokenization; null = all cores (capped by the row count)."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, e.g. {enable_thinking: false}; a row's own
    `chat_template_kwargs` column wins over these."""
    reasoning_turns: ReasoningTurns = ReasoningTurns.all
    """all: every assistant turn's reasoning is trained as generated, turns whose reasoning the
    template drops from history get their own example | last: only where the full rendering keeps it."""
    reasoning_format: ReasoningFormat = ReasoningFormat.inline
    """Reasoning on a template with no place for it: inline (<think>...</think> before the answer) | drop."""


@dataclass
class ModelConfig:
    name_or_path: str = "???"
    """Local HF model folder or hub id."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id; null = model.name_or_path."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto."""
    attn_implementation: str = "auto"
    """auto = the fastest backend that isolates packed examples."""
    trust_remote_code: bool = False
    """Run model code from the hub repo; off unless a recipe turns it on."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for reproducibility."""


@dataclass
class PackConfig:
    strategy: str = "bfd"
    """bfd (best-fit decreasing) | wrapped (concatenate and cut) | none."""


@dataclass
class PeftConfig:
    method: str = "lora"
    """lora | none (full fine-tuning)."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: Any = "all-linear"
    """Module names to adapt, or `all-linear`."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full (default: embeddings when the template added tokens)."""


@dataclass
class OptimConfig:
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to norms and biases)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: str = "cosine"
    """cosine | linear | constant."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of total steps (used when warmup_steps is 0)."""
    min_lr_ratio: float = 0.0
    """Final lr as a fraction of the peak."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold (0 = off)."""


@dataclass
class TrainerConfig:
    micro_batch_size: int = 4
    """Packed rows per forward pass (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = -1
    """Optimizer steps; -1 = derive from epochs."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is -1."""
    neftune_alpha: float = 0.0
    """NEFTune noise scale (0 = off)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    eval_every: int = 0
    """Eval loss every N optimizer steps (0 = only at the end)."""
    log_every: int = 1
    """Console log interval in optimizer steps."""
    resume: str = "auto"
    """auto (continue from the latest complete checkpoint) | never."""
    max_bad_steps: int = 5
    """Consecutive non-finite steps tolerated before stopping."""
    nproc: Any = 1
    """Processes on this node: an int, or auto (= visible GPUs, 1 on CPU). >1 launches torchrun."""
    nnodes: int = 1
    """Nodes in the job; run the same command on each with its own node_rank."""
    node_rank: int = 0
    """This node's index (0 hosts the rendezvous when rdzv_endpoint points at it)."""
    rdzv_endpoint: str | None = None
    """host:port of the c10d rendezvous; null = a free port on 127.0.0.1 (single node only)."""
    parallel: str = "auto"
    """ddp | fsdp (FSDP2 fully_shard) | auto (fsdp for full fine-tuning of >= 1B params, else ddp)."""
    compile: bool = False
    """torch.compile each decoder layer (faster steps on GPUs after a one-off compile)."""
    dist_timeout_s: int = 1800
    """Seconds a collective may wait for the slowest rank (checkpoint hashing, evaluation) before failing."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers: any of tensorboard, wandb (offline unless logged in), mlflow (MLFLOW_TRACKING_URI,
    else run_dir/mlruns). [] = TensorBoard when it is installed. Rank 0 logs the config, metrics, eval and plots."""


@dataclass
class EvalConfig:
    model: str | None = None
    """What to evaluate: null = run_dir/final; or a checkpoint folder, an adapter folder, any HF model path."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Other data to evaluate on (prepared like training data); empty = the run's eval split."""
    prompts: str | None = None
    """JSONL of prompts for generations ({"messages": [...]} or {"prompt": "..."}); null = eval split prompts."""
    num_prompts: int = 16
    """Prompts to generate replies for."""
    max_new_tokens: int = 128
    """Generation length limit; replies that hit it are counted as not stopping on their own."""
    temperature: float = 0.7
    """Sampling temperature for the sampled replies (greedy replies are also generated)."""
    top_p: float = 0.9
    """Nucleus sampling threshold for the sampled replies."""
    general_text: str | None = None
    """Plain-text JSONL ({"text": ...}) for the forgetting check; null = the run's text sources, else
    the shipped general-text sample."""
    compare_base: bool = True
    """Also evaluate the base model (forgetting, diversity: base vs tuned in one report)."""
    micro_batch_size: int = 4
    """Packed rows per forward pass."""
    harness_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks to run when the package is installed (e.g. [hellaswag])."""


@dataclass
class MergeConfig:
    force: bool = False
    """Overwrite an existing run_dir/merged/."""
    max_shard_size: str = "2GB"
    """safetensors shard size of the merged model."""


@dataclass
class GenSourceConfig(SourceConfig):
    """A prompt source for `sft generate`: any data source (same formats as prepare) plus how its replies are scored."""
    scorer: str | None = None
    """match | tests | reward | none; null = gen.scorer."""
    extract: str | None = None
    """How `match` finds the final answer (letter, number, boxed, regex, exact); null = gen.extract."""
    pattern: str | None = None
    """Regex for extract=regex (group 1, else the whole match); null = gen.pattern."""
    limit: int | None = None
    """Use only this source's first N prompts; null = all."""


@dataclass
class GenConfig:
    model: str | None = None
    """What samples: null = this run (run_dir/merged, else run_dir/final, else model.name_or_path); a run_dir
    (its merged/ or final/, with the run's own chat template); a run's final/ merged/ or checkpoint; any HF
    model folder or hub id (with model.chat_template / its own template)."""
    prompts: str | None = None
    """One prompt file (messages ending on a user turn, or prompt/answer rows); replaces gen.sources when set."""
    sources: list[GenSourceConfig] = field(default_factory=list)
    """Several prompt sources, each with its own scorer (see recipes/rejection-sampling.yaml)."""
    n: int = 8
    """Samples per prompt."""
    temperature: float = 0.8
    """0 = greedy (then n must be 1)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    top_k: int = 0
    """Sample from the k likeliest tokens only (0 = off)."""
    max_new_tokens: int = 512
    """Length limit; a reply that hits it is `truncated` and not kept unless gen.keep_truncated."""
    seed: int | None = None
    """Sampling seed; null = the run's seed. Each sample has its own stream (seed, prompt, sample), so results do
    not depend on batch size, batch order or on resuming."""
    engine: str = "auto"
    """transformers (batched model.generate, CPU or GPU) | vllm | auto (vllm when installed and a GPU is present)."""
    batch_size: int = 32
    """Sequences per transformers generate call (prompts x samples)."""
    scorer: str = "none"
    """match: final answer vs the row's reference; tests: the row's unit tests in a sandboxed subprocess;
    reward: gen.reward_model's score; none: keep every sample (plain distillation)."""
    extract: str = "letter"
    """match: letter (multiple choice) | number (last number) | boxed (\\boxed{}) | regex (gen.pattern) | exact."""
    pattern: str | None = None
    """match with extract=regex: the answer's regex."""
    answer_field: str = "answer"
    """A row column holding the bare reference answer; rows without it use their reference reply."""
    reward_model: str | None = None
    """scorer=reward: a sequence-classification model folder or hub id."""
    reward_batch_size: int = 8
    test_timeout_s: float = 10.0
    """scorer=tests: wall-clock limit per sample's test run."""
    test_memory_mb: int = 1024
    """scorer=tests: address-space limit per test run."""
    test_workers: int | None = None
    """scorer=tests: test runs at a time; null = CPU count."""
    select: str = "best"
    """best: one reply per prompt | all_passing | top_k (gen.select_k replies per prompt)."""
    select_k: int = 2
    """Replies kept per prompt by select=top_k."""
    min_score: float | None = None
    """Keep only replies scoring at least this (reward scorer); match/tests keep only passing replies."""
    dedupe: float | None = 0.9
    """Drop a reply whose word-trigram Jaccard similarity to a kept reply of the same prompt is >= this; null = off."""
    keep_truncated: bool = False
    """Also keep replies cut at max_new_tokens (they teach the model not to stop)."""
    num_prompts: int | None = None
    """Use only the first N prompts over all sources; null = all."""
    overwrite: bool = False
    """Start over when run_dir/generated holds samples of a different config (default: refuse)."""


@dataclass
class SFTConfig:
    run_dir: str = "runs/default"
    """Every artifact of a run lives here: prepared/ packed/ checkpoints/ final/ eval/ merged/."""
    seed: int = 42
    """Seed for data mixing, splits, packing order and training."""
    max_seq_len: int = 2048
    """Maximum tokens per example and per packed row."""
    show: int = 0
    """`sft prepare show=N`: print N prepared examples token by token with loss tokens highlighted."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    gen: GenConfig = field(default_factory=GenConfig)


# run_dir sub-folders: the public layout of a run (see README).
RUN_SUBDIRS = ("prepared", "packed", "checkpoints", "final", "eval", "merged", "generated")


def to_yaml(cfg: SFTConfig) -> str:
    """The resolved config as YAML: what run_dir/config.yaml holds and every later stage reads."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_dict(cfg: SFTConfig) -> dict:
    """The resolved config as plain nested dicts (enums as their values): what trackers record."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def load_config(path: str) -> SFTConfig:
    """Read a resolved config.yaml back into a typed SFTConfig (no Hydra involved)."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(SFTConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def run_config(cfg: SFTConfig) -> SFTConfig:
    """evaluate / merge-lora: the config the run was trained with (run_dir/config.yaml), with only
    the eval.* and merge.* keys taken from this command. Without a saved config, `cfg` itself."""
    from pathlib import Path

    saved = Path(cfg.run_dir) / "config.yaml"
    if not saved.is_file():
        return cfg
    run = load_config(str(saved))
    run.eval, run.merge, run.run_dir = cfg.eval, cfg.merge, cfg.run_dir
    return run


# ---- validation: every value with a constrained domain, checked before any verb runs ----------


def validate(cfg: SFTConfig) -> None:
    """Raise ConfigError(key, problem, fix) for the first value outside its domain.

    Struct mode and the dataclass types already reject unknown keys and wrong types; this catches
    what they cannot see (a negative batch size, an unknown schedule name), so a bad value fails at
    once with its key named instead of minutes later, or never, as a confusing internal error.
    """
    _validate_top(cfg)
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    _validate_pack(cfg.pack)
    _validate_peft(cfg.peft)
    _validate_optim(cfg.optim)
    _validate_trainer(cfg.trainer)
    _validate_eval(cfg.eval)
    _validate_merge(cfg.merge)
    _validate_gen(cfg.gen)


def _fail(key: str, value: Any, problem: str, fix: str) -> None:
    raise ConfigError(key, f"{value!r} {problem}", fix)


def _int_at_least(key: str, value: int, low: int, fix: str = "", high: int | None = None) -> None:
    # bool is an int subclass: `true` where a count is expected is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, value, "is not an integer", fix or f"use an integer >= {low}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        _fail(key, value, f"must be {bound}", fix or f"use an integer {bound}")


def _number(key: str, value: float, low: float, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False, fix: str = "") -> None:
    """A finite number in [low, high] (either end open on request); `inf`/`nan` never pass."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(key, value, "is not a finite number", fix or "use a plain number, e.g. 0.1")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        if high == math.inf:
            bound = f"> {low}" if low_open else f">= {low}"
        else:
            bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        _fail(key, value, f"must be {bound}", fix or f"use a value {bound}")


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        _fail(key, value, "is not a known choice", f"use one of: {', '.join(map(str, choices))}")


def _text(key: str, value: Any, *, optional: bool = False, fix: str = "") -> None:
    """A non-empty string without NUL (which no path or name can hold); None only if optional."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        _fail(key, value, "must be a non-empty string", fix or f"set {key}=...")
    if "\x00" in value:
        _fail(key, value, "contains a NUL character", "remove it; no file name can hold one")


def _str_list(key: str, value: Any, *, allow_empty: bool = True) -> None:
    if not isinstance(value, list | tuple) or (not allow_empty and not value):
        _fail(key, value, "must be a list of strings", f"e.g. {key}=[a,b]")
    for i, item in enumerate(value):
        _text(f"{key}[{i}]", item)


def _validate_top(cfg: SFTConfig) -> None:
    _text("run_dir", cfg.run_dir, fix="e.g. run_dir=runs/my-run")
    _int_at_least("seed", cfg.seed, 0, high=MAX_SEED)
    _int_at_least("max_seq_len", cfg.max_seq_len, MIN_SEQ_LEN, high=MAX_SEQ_LEN, fix="use e.g. 2048")
    _int_at_least("show", cfg.show, 0, fix="show=N prints N prepared examples; 0 prints none")


def _validate_model(model: ModelConfig) -> None:
    _text("model.name_or_path", model.name_or_path, fix="a local HF model folder or a hub id")
    _text("model.tokenizer", model.tokenizer, optional=True)
    _choice("model.dtype", model.dtype, ("auto", *DTYPES))
    _choice("model.attn_implementation", model.attn_implementation, ("auto", *ATTENTION_BACKENDS))
    _text("model.revision", model.revision, optional=True)


def _validate_source(key: str, src: SourceConfig) -> None:
    _text(f"{key}.path", src.path, fix="a file, glob, save_to_disk folder or hub dataset id")
    if src.weight is not None:
        _number(f"{key}.weight", src.weight, 0, low_open=True, fix="use a positive share, or drop the source")
    _text(f"{key}.name", src.name, optional=True)
    if src.name is not None and any(ch in src.name for ch in "\n\r\t"):
        _fail(f"{key}.name", src.name, "contains a line break or tab", "use a one-line label")
    _text(f"{key}.hub_split", src.hub_split, fix="e.g. train")
    for ours, theirs in src.columns.items():
        _text(f"{key}.columns.{ours}", theirs)


def _validate_data(data: DataConfig) -> None:
    for i, src in enumerate(data.sources):
        _validate_source(f"data.sources[{i}]", src)
    # Weights are shares of the training mix: on every training source or on none (eval sources take no share).
    train = [(i, src) for i, src in enumerate(data.sources) if src.split == Split.train]
    unweighted = [i for i, src in train if src.weight is None]
    if unweighted and len(unweighted) != len(train):
        raise ConfigError(f"data.sources[{unweighted[0]}].weight", "is unset while other sources have weights",
                          "give every training source a weight, or none (each example used once)")
    _text("data.chat_template", data.chat_template, optional=True)
    _number("data.eval_fraction", data.eval_fraction, 0, 1, high_open=True, fix="use e.g. 0.05 (0 = no eval split)")
    if data.num_proc is not None:
        _int_at_least("data.num_proc", data.num_proc, 1, fix="use a positive worker count, or null for all cores")


def _validate_pack(pack: PackConfig) -> None:
    _choice("pack.strategy", pack.strategy, PACK_STRATEGIES)


def _validate_peft(peft: PeftConfig) -> None:
    _choice("peft.method", peft.method, PEFT_METHODS)
    _int_at_least("peft.r", peft.r, 1, fix="use a LoRA rank such as 8 or 16")
    _number("peft.alpha", peft.alpha, 0, low_open=True, fix="use e.g. 2 * peft.r")
    _number("peft.dropout", peft.dropout, 0, 1, high_open=True, fix="use e.g. 0.05")
    if isinstance(peft.target_modules, str):
        _text("peft.target_modules", peft.target_modules, fix="use all-linear or a list of module names")
    else:
        _str_list("peft.target_modules", peft.target_modules, allow_empty=False)
    if peft.modules_to_save is not None:
        _str_list("peft.modules_to_save", peft.modules_to_save)


def _validate_optim(optim: OptimConfig) -> None:
    _number("optim.lr", optim.lr, 0, low_open=True, fix="use e.g. 2e-4")
    _number("optim.weight_decay", optim.weight_decay, 0, fix="use e.g. 0.0 or 0.01")
    if len(optim.betas) != 2:
        _fail("optim.betas", optim.betas, "must be two numbers", "use e.g. optim.betas=[0.9,0.999]")
    for i, beta in enumerate(optim.betas):
        _number(f"optim.betas[{i}]", beta, 0, 1, high_open=True, fix="AdamW betas lie in [0, 1), e.g. [0.9,0.999]")
    _number("optim.eps", optim.eps, 0, low_open=True, fix="use e.g. 1e-8")
    _choice("optim.schedule", optim.schedule, SCHEDULES)
    _int_at_least("optim.warmup_steps", optim.warmup_steps, 0)
    _number("optim.warmup_ratio", optim.warmup_ratio, 0, 1, fix="a fraction of the total steps, e.g. 0.03")
    _number("optim.min_lr_ratio", optim.min_lr_ratio, 0, 1, fix="a fraction of the peak lr, e.g. 0.1")
    _number("optim.max_grad_norm", optim.max_grad_norm, 0, fix="use e.g. 1.0 (0 = no clipping)")


def _validate_nproc(value: Any) -> None:
    # Any-typed (an int or `auto`); launch.py turns it into a count the same way.
    if value == "auto":
        return
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail("trainer.nproc", value, "is not a process count", "use a positive int or auto")


def _validate_endpoint(endpoint: str | None) -> None:
    if endpoint is None:
        return
    host, _, port = str(endpoint).rpartition(":")
    if not host.strip() or not port.isdigit() or not 1 <= int(port) <= 65535:
        _fail("trainer.rdzv_endpoint", endpoint, "is not HOST:PORT", "e.g. 10.0.0.1:29500")


def _validate_trainer(trainer: TrainerConfig) -> None:
    _int_at_least("trainer.micro_batch_size", trainer.micro_batch_size, 1)
    _int_at_least("trainer.grad_accum", trainer.grad_accum, 1)
    if trainer.max_steps != -1:
        _int_at_least("trainer.max_steps", trainer.max_steps, 1, fix="use a positive step count, or -1 for epochs")
    _number("trainer.epochs", trainer.epochs, 0, low_open=True, fix="use e.g. 1 or 0.5")
    _number("trainer.neftune_alpha", trainer.neftune_alpha, 0, fix="use e.g. 5 (0 = off)")
    _int_at_least("trainer.save_every", trainer.save_every, 0, fix="steps between checkpoints (0 = only at the end)")
    _int_at_least("trainer.keep_last", trainer.keep_last, 0, fix="checkpoints to keep, e.g. 2 (0 = keep all)")
    _int_at_least("trainer.eval_every", trainer.eval_every, 0, fix="steps between evals (0 = only at the end)")
    _int_at_least("trainer.log_every", trainer.log_every, 1)
    _int_at_least("trainer.max_bad_steps", trainer.max_bad_steps, 0)
    _choice("trainer.resume", trainer.resume, RESUME_MODES)
    _validate_nproc(trainer.nproc)
    _int_at_least("trainer.nnodes", trainer.nnodes, 1)
    _int_at_least("trainer.node_rank", trainer.node_rank, 0, high=trainer.nnodes - 1,
                  fix="give each node a distinct rank from 0 to trainer.nnodes - 1")
    _validate_endpoint(trainer.rdzv_endpoint)
    _int_at_least("trainer.dist_timeout_s", trainer.dist_timeout_s, 1, fix="seconds, e.g. 1800")
    _choice("trainer.parallel", trainer.parallel, PARALLEL_STRATEGIES)
    _validate_trackers(trainer.report_to)


def _validate_trackers(names: Any) -> None:
    """Known tracker names whose package is installed (found, not imported: validate() loads nothing)."""
    import importlib.util

    _str_list("trainer.report_to", names)
    for i, name in enumerate(names):
        _choice(f"trainer.report_to[{i}]", name, tuple(TRACKER_PACKAGES))
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            _fail(f"trainer.report_to[{i}]", name, f"needs the {package} package, which is not installed",
                  f"pip install {package}" + (" (or mlflow-skinny)" if package == "mlflow" else "")
                  + f", or drop {name} from trainer.report_to")


def _validate_eval(ev: EvalConfig) -> None:
    _text("eval.model", ev.model, optional=True)
    for i, src in enumerate(ev.sources):
        _validate_source(f"eval.sources[{i}]", src)
    _text("eval.prompts", ev.prompts, optional=True)
    _int_at_least("eval.num_prompts", ev.num_prompts, 0)
    _int_at_least("eval.max_new_tokens", ev.max_new_tokens, 1)
    _number("eval.temperature", ev.temperature, 0, low_open=True, fix="use e.g. 0.7 (greedy replies are made too)")
    _number("eval.top_p", ev.top_p, 0, 1, low_open=True, fix="use e.g. 0.9")
    _text("eval.general_text", ev.general_text, optional=True)
    _int_at_least("eval.micro_batch_size", ev.micro_batch_size, 1)
    _str_list("eval.harness_tasks", ev.harness_tasks)


def _validate_merge(merge: MergeConfig) -> None:
    if not SHARD_SIZE.match(str(merge.max_shard_size)):
        _fail("merge.max_shard_size", merge.max_shard_size, "is not a size", "use a number and a unit: 500MB, 2GB, 1TB")


def _validate_gen(gen: GenConfig) -> None:
    _text("gen.model", gen.model, optional=True)
    _text("gen.prompts", gen.prompts, optional=True)
    for i, src in enumerate(gen.sources):
        key = f"gen.sources[{i}]"
        _validate_source(key, src)
        if src.scorer is not None:
            _choice(f"{key}.scorer", src.scorer, GEN_SCORERS)
        if src.extract is not None:
            _choice(f"{key}.extract", src.extract, GEN_EXTRACTORS)
        if src.limit is not None:
            _int_at_least(f"{key}.limit", src.limit, 1)
        _regex(f"{key}.pattern", src.pattern)
    _int_at_least("gen.n", gen.n, 1, fix="use e.g. gen.n=8")
    _number("gen.temperature", gen.temperature, 0, fix="use e.g. 0.8, or 0 for greedy")
    if gen.temperature == 0 and gen.n > 1:
        _fail("gen.n", gen.n, "greedy decoding (gen.temperature=0) gives one reply per prompt", "set gen.n=1, "
              "or a temperature > 0")
    _number("gen.top_p", gen.top_p, 0, 1, low_open=True, fix="use e.g. 0.95 (1 = off)")
    _int_at_least("gen.top_k", gen.top_k, 0, fix="0 = off")
    _int_at_least("gen.max_new_tokens", gen.max_new_tokens, 1)
    if gen.seed is not None:
        _int_at_least("gen.seed", gen.seed, 0, high=MAX_SEED)
    _choice("gen.engine", gen.engine, GEN_ENGINES)
    _int_at_least("gen.batch_size", gen.batch_size, 1)
    _choice("gen.scorer", gen.scorer, GEN_SCORERS)
    _choice("gen.extract", gen.extract, GEN_EXTRACTORS)
    _regex("gen.pattern", gen.pattern)
    _text("gen.answer_field", gen.answer_field)
    _text("gen.reward_model", gen.reward_model, optional=True)
    _int_at_least("gen.reward_batch_size", gen.reward_batch_size, 1)
    _number("gen.test_timeout_s", gen.test_timeout_s, 0, low_open=True)
    _int_at_least("gen.test_memory_mb", gen.test_memory_mb, 64)
    if gen.test_workers is not None:
        _int_at_least("gen.test_workers", gen.test_workers, 1)
    _choice("gen.select", gen.select, GEN_SELECTIONS)
    _int_at_least("gen.select_k", gen.select_k, 1)
    if gen.dedupe is not None:
        _number("gen.dedupe", gen.dedupe, 0, 1, low_open=True, fix="use e.g. 0.9 (1 = exact duplicates), or null")
    if gen.num_prompts is not None:
        _int_at_least("gen.num_prompts", gen.num_prompts, 1)
    scorers = {src.scorer or gen.scorer for src in gen.sources} if gen.sources and not gen.prompts else {gen.scorer}
    if "reward" in scorers and not gen.reward_model:
        _fail("gen.reward_model", None, "scorer=reward needs a reward model", "set gen.reward_model=PATH_OR_HUB_ID")
    extracts = {(src.extract or gen.extract, src.pattern or gen.pattern) for src in gen.sources} \
        if gen.sources and not gen.prompts else {(gen.extract, gen.pattern)}
    if "match" in scorers and any(how == "regex" and not pattern for how, pattern in extracts):
        _fail("gen.pattern", None, "extract=regex needs a pattern", "set gen.pattern='answer: (\\w+)'")


def _regex(key: str, value: Any) -> None:
    if value is None:
        return
    _text(key, value)
    try:
        re.compile(value)
    except re.error as exc:
        _fail(key, value, f"is not a valid regular expression ({exc})", "fix the pattern (Python re syntax)")
