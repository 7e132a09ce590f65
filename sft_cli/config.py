"""The one config schema every verb reads, as typed dataclasses.

Defaults live here and only here; each field's docstring is the documentation
(`sft VERB --help` shows the composed result). Hydra registers these classes in
its ConfigStore with struct mode on, so an unknown key or a wrong type is an
error that names the key before any work starts.

    >>> from sft_cli.config import SFTConfig
    >>> SFTConfig().data.loss_on
    <LossOn.assistant: 'assistant'>
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


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


class Split(str, Enum):
    train = "train"  # split by data.eval_fraction
    eval = "eval"  # the whole source is evaluation data


@dataclass
class SourceConfig:
    path: str = "???"
    """Local file, glob, folder written by `datasets.save_to_disk`, or a hub dataset id."""
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
    """Split to read when `path` is a hub dataset id or a DatasetDict folder."""
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


# run_dir sub-folders: the public layout of a run (see README).
RUN_SUBDIRS = ("prepared", "packed", "checkpoints", "final", "eval", "merged")


def to_yaml(cfg: SFTConfig) -> str:
    """The resolved config as YAML: what run_dir/config.yaml holds and every later stage reads."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


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
