"""The rejection-sampling loop through the real CLI on the tiny model: generate from a trained run ->
prepare + train a new run on the kept replies -> evaluate it -> generate again from the new model."""

import json

from tests.conftest import TINY_MODEL, _write_jsonl


def test_generate_prepare_train_evaluate_generate(lora_run, sft, tmp_path):
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": f"Say something {i}"}]}
                                                        for i in range(12)])
    first = tmp_path / "round1"
    sample = ["gen.n=2", "gen.max_new_tokens=12", "gen.temperature=1.0", "gen.keep_truncated=true",
              "gen.select=all_passing", f"gen.prompts={prompts}"]
    generated = sft("generate", f"gen.model={lora_run}", f"run_dir={first}", *sample)
    assert generated.returncode == 0, generated.stderr[-3000:]
    data = first / "generated" / "data.jsonl"
    kept = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(kept) >= 12  # most of 24 samples have content

    train = ["train", f"model.name_or_path={TINY_MODEL}", f"data.sources=[{{path: {data}}}]", f"run_dir={first}",
             "data.eval_fraction=0.2", "max_seq_len=128", "trainer.micro_batch_size=2", "trainer.max_steps=3",
             "trainer.save_every=3", "optim.lr=3e-3"]
    trained = sft(*train)
    assert trained.returncode == 0, trained.stderr[-3000:]
    prepared = json.loads((first / "prepared" / "report.json").read_text())
    assert prepared["rejected"] == 0 and prepared["kept"] == len(kept)  # generated data prepares whole
    assert (first / "final" / "adapter_config.json").is_file()

    evaluated = sft("evaluate", f"run_dir={first}", "eval.num_prompts=2", "eval.max_new_tokens=4")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((first / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"tuned", "base"}

    # Round two samples from round one's model (its final/ and its chat template), into a new run_dir.
    second = tmp_path / "round2"
    again = sft("generate", f"gen.model={first}", f"run_dir={second}", *sample)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((second / "generated" / "report.json").read_text())
    assert str(first / "final") in report["model"] and report["samples"] == 24
