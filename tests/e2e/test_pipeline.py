"""The whole pipeline through the real CLI, verb by verb: prepare -> pack -> train (LoRA) -> evaluate
-> merge-lora -> merged/ reloads with plain transformers, matches base+adapter, and evaluates to the
same loss. (merge-lora's own checks and refusals: test_merge.py.)"""

import json

import pytest
import torch


def test_full_pipeline_merged_model_equals_base_plus_adapter(lora_run_copy, sft):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = lora_run_copy  # prepared, packed and trained verb by verb (conftest.lora_run)
    evaluated = sft("evaluate", f"run_dir={run_dir}", "eval.num_prompts=2", "eval.max_new_tokens=4",
                    "eval.compare_base=false")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    adapter_loss = json.loads((run_dir / "eval" / "report.json").read_text())["models"]["tuned"]["loss"]
    merged = sft("merge-lora", f"run_dir={run_dir}")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "Traceback" not in merged.stderr and (run_dir / "merged" / "manifest.json").exists()
    assert not (run_dir / "merged" / "adapter_config.json").exists()

    # Plain transformers, no peft: the merged folder is a whole model.
    plain = AutoModelForCausalLM.from_pretrained(str(run_dir / "merged")).eval()
    base_path = json.loads((run_dir / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(run_dir / "final")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "merged"))
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say something"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, adapted(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # the adapter is not a no-op, so the check means something
    generation = json.loads((run_dir / "merged" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == json.loads((run_dir / "final" / "generation_config.json").read_text())[
        "eos_token_id"]

    # evaluate on the merged model gives the same loss as on base+adapter.
    on_merged = sft("evaluate", f"run_dir={run_dir}", f"eval.model={run_dir / 'merged'}", "eval.num_prompts=2",
                    "eval.max_new_tokens=4", "eval.compare_base=false")
    assert on_merged.returncode == 0, on_merged.stderr[-3000:]
    merged_loss = json.loads((run_dir / "eval" / "report.json").read_text())["models"]["tuned"]["loss"]
    assert merged_loss == pytest.approx(adapter_loss, rel=1e-5)

    # merged/ exists: refused without merge.force (untouched), replaced with it.
    before = (run_dir / "merged" / "manifest.json").read_text()
    again = sft("merge-lora", f"run_dir={run_dir}")
    assert again.returncode == 2 and "merge.force" in again.stderr
    assert (run_dir / "merged" / "manifest.json").read_text() == before
    forced = sft("merge-lora", f"run_dir={run_dir}", "merge.force=true")
    assert forced.returncode == 0, forced.stderr[-2000:]
