"""`sft merge-lora` through the real CLI: merged/ loads with plain transformers (no peft) and equals
base + adapter, also when training grew the vocabulary of a tied-embedding model; every refusal is
one clear message and exit code, never a traceback. Plus the verification's tolerance rule, by hand.

Each CLI run costs 5-10 s of CPU, mostly single-threaded imports, so independent runs go three at
a time (`_parallel`: keeps 2 cores busy despite uneven lengths) and the trained runs are shared by
the whole module.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from sft_cli.config import SHARD_SIZE
from sft_cli.merge import compare, quantisation
from tests.conftest import TINY_MODEL, _run_sft, train_args, write_chat_jsonl


def _each(*commands: tuple[str, ...]) -> list:
    """Run `sft` commands one after another (in this process: no per-call imports); results in order."""
    return [_run_sft(*args) for args in commands]


def _train(root: Path, run: str, model: str = TINY_MODEL, *extra: str) -> tuple[str, ...]:
    return tuple(train_args(root / "chat.jsonl", root / run, "trainer.micro_batch_size=2", "trainer.max_steps=3",
                            "optim.lr=2e-3", *extra, eval_fraction=0.2, max_seq_len=128, model=model))


def _said(result) -> str:
    """stderr with rich's line wrapping undone, for matching phrases."""
    return " ".join(result.stderr.split())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, lora_run) -> Path:
    """lora: plain LoRA (a copy of conftest.lora_run). grown: Qwen2-style tied embeddings, and the chatml template adds two tokens
    to a zephyr tokenizer (so the adapter carries embeddings and head). full: full fine-tuning."""
    root = tmp_path_factory.mktemp("merge")
    write_chat_jsonl(root / "chat.jsonl", rows=40, max_words=20)
    shutil.copytree(lora_run, root / "lora")
    trained = _each(_train(root, "grown", "builtin:tiny-qwen2-zephyr", "data.chat_template=chatml"),
                        _train(root, "full", "builtin:tiny-llama-chatml", "peft=none", "trainer.max_steps=2"))
    for result in trained:
        assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def merged(runs) -> dict:
    # grown/ in shards of 200KB (its weights are ~560KB): the reload below goes through the index.
    results = _each(("merge-lora", f"run_dir={runs / 'lora'}"),
                        ("merge-lora", f"run_dir={runs / 'grown'}", "merge.max_shard_size=200KB"))
    return dict(zip(("lora", "grown"), results))


@pytest.mark.parametrize("run", ["lora", "grown"])
@pytest.mark.filterwarnings("ignore:.*ensure_weight_tying")
def test_merged_model_loads_plain_and_equals_base_plus_adapter(runs, merged, run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, folder, final = merged[run], runs / run / "merged", runs / run / "final"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "max |merged - (base + adapter)|" in result.stdout
    assert (folder / "manifest.json").is_file() and not (folder / "adapter_config.json").exists()

    plain = AutoModelForCausalLM.from_pretrained(str(folder)).eval()  # transformers only
    assert not any("lora" in name for name, _ in plain.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    base = AutoModelForCausalLM.from_pretrained(json.loads((final / "adapter_config.json").read_text())[
        "base_model_name_or_path"])
    if run == "grown":
        assert len(tokenizer) > base.get_input_embeddings().weight.shape[0]
        assert not plain.config.tie_word_embeddings
        assert "tie_word_embeddings=false" in " ".join(result.stdout.split())
        assert len(list(folder.glob("model-*.safetensors"))) > 1
        assert (folder / "model.safetensors.index.json").is_file()
        # The base's new rows are random; the adapter's saved embeddings and head must replace them.
        base.resize_token_embeddings(len(tokenizer))
    adapted = PeftModel.from_pretrained(base, str(final)).eval()
    assert any(p.abs().max() > 0 for name, p in adapted.named_parameters() if "lora_B" in name)  # not a no-op

    # A chat prompt: in `grown` its <|im_start|> / <|im_end|> are the added tokens.
    chat = [{"role": "user", "content": "Say something 3"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5

    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == json.loads((final / "generation_config.json").read_text())["eos_token_id"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["verification"]["ok"] and manifest["verification"]["dtype"] == "float32"


def test_refusals_are_one_message_and_write_nothing(runs, merged, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    lora, grown = runs / "lora", runs / "grown"
    assert merged["lora"].returncode == 0 and merged["grown"].returncode == 0
    before = {run: (run / "merged" / "manifest.json").read_text() for run in (lora, grown)}
    base = Path(json.loads((lora / "final" / "adapter_config.json").read_text())["base_model_name_or_path"])

    def run_copy(name: str, base_dir: Path | None = None, final: bool = True) -> Path:
        """lora's config.yaml (and final/), pointed at another base."""
        copy = tmp_path / name
        copy.mkdir()
        text = (lora / "config.yaml").read_text()
        if base_dir:
            text = text.replace("name_or_path: builtin:tiny-llama-chatml", f"name_or_path: {base_dir}")
        (copy / "config.yaml").write_text(text)
        if final:
            shutil.copytree(lora / "final", copy / "final")
        return copy

    quantised = tmp_path / "quantised-base"
    shutil.copytree(base, quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))

    def other_base(name: str, **changes) -> Path:
        """A random-init model like the run's base, with `changes` to its config."""
        config = AutoConfig.from_pretrained(str(base))
        for key, value in changes.items():
            setattr(config, key, value)
        folder = tmp_path / name
        AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(base / file, folder / file)
        return folder

    # wider: every mlp LoRA matrix has the wrong shape (peft raises). shallower: peft would drop the
    # second layer's LoRA weights without a word.
    wider = other_base("wider-base", intermediate_size=2 * AutoConfig.from_pretrained(str(base)).intermediate_size)
    shallower = other_base("shallower-base", num_hidden_layers=1)

    cases = {"again": (lora, 2, ["merge.force", "already exists"]),
             "full": (runs / "full", 1, ["not an adapter", "already a plain model"]),
             "never": (run_copy("never", final=False), 1, ["train first"]),
             "quantised": (run_copy("quantised", quantised), 1, ["is quantised (bitsandbytes)", "Dequantise"]),
             "wider": (run_copy("wider", wider), 1, ["does not fit the base model", "size mismatch"]),
             "shallower": (run_copy("shallower", shallower), 1, ["does not fit the base model", "no place in it"])}
    # All at once, with grown/ merged again with merge.force=true (lora/ is the one refused).
    forced, *results = _each(("merge-lora", f"run_dir={grown}", "merge.force=true"),
                                 *[("merge-lora", f"run_dir={run_dir}") for run_dir, _, _ in cases.values()])
    for (name, (run_dir, code, phrases)), result in zip(cases.items(), results):
        assert result.returncode == code, (name, result.stderr[-2000:])
        assert all(phrase in _said(result) for phrase in phrases), (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, name
        if name != "again":
            assert not (run_dir / "merged").exists() and not list(run_dir.glob(".merged.tmp-*")), name
    assert (lora / "merged" / "manifest.json").read_text() == before[lora]  # refused means untouched

    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (grown / "merged" / "manifest.json").read_text() != before[grown]
    assert not list(grown.glob(".merged.*"))  # the old output and the temp folder are gone


def test_a_failed_check_writes_nothing(runs, merged, monkeypatch):
    from sft_cli import merge
    from sft_cli.config import load_config
    from sft_cli.errors import SFTError

    reload = merge.load_plain

    def off_by_one_percent(folder, cfg):  # as if the save had mangled the LM head
        model = reload(folder, cfg)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(1.01)
        return model

    monkeypatch.setattr(merge, "load_plain", off_by_one_percent)
    lora = runs / "lora"
    before = (lora / "merged" / "manifest.json").read_text()
    cfg = load_config(str(lora / "config.yaml"))
    cfg.merge.force = True
    with pytest.raises(SFTError, match=r"differ from base \+ adapter.*nothing written"):
        merge.run(cfg)
    assert (lora / "merged" / "manifest.json").read_text() == before and not list(lora.glob(".merged.*"))


# -- the verification rule, by hand ---------------------------------------------------------------

def test_compare_is_tight_in_float32_and_tolerates_only_rounding_noise_in_bf16():
    torch.manual_seed(0)
    reference = [torch.randn(1, 8, 50) * 10 for _ in range(2)]  # logit scale ~40, std 10
    check = compare([r + 1e-4 for r in reference], reference, torch.float32)
    assert check["ok"] and check["tolerance"] == pytest.approx(1e-4 * check["logit_scale"])
    assert not compare([r + 0.01 for r in reference], reference, torch.float32)["ok"]
    # bf16: noise of 3% of the spread everywhere passes; a lost head (unrelated logits) does not.
    noisy = [r + 0.3 * torch.randn_like(r) for r in reference]
    assert compare(noisy, reference, torch.bfloat16)["ok"]
    assert not compare([torch.randn_like(r) * 10 for r in reference], reference, torch.bfloat16)["ok"]
    nan = [r.clone() for r in reference]
    nan[1][0, 3, 7] = float("nan")
    assert not compare(nan, reference, torch.bfloat16)["ok"]
    # Small logits: the tolerance never shrinks below the dtype's fraction of 1.
    assert compare([torch.zeros(1, 2, 3)], [torch.zeros(1, 2, 3)], torch.float32)["tolerance"] == 1e-4


def test_quantisation_and_shard_size_are_read_like_transformers_does():
    class Config:
        quantization_config = {"quant_method": "gptq", "bits": 4}

    assert quantisation(Config()) == "gptq" and quantisation(object()) is None
    assert all(SHARD_SIZE.match(size) for size in ("2GB", "500MB", "200kb", "1.5GB"))
    assert not any(SHARD_SIZE.match(size) for size in ("2", "2 gigs", "GB", "5GiB"))
