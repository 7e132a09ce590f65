"""The command-line contract: verbs, help, exit codes, recipes, precedence."""

from pathlib import Path

import pytest

from sft_cli.cli import RECIPES_DIR


def test_top_level_help_lists_every_verb(sft):
    result = sft("--help")
    assert result.returncode == 0
    for verb in ("prepare", "pack", "train", "evaluate", "merge-lora"):
        assert verb in result.stdout


def test_no_verb_and_unknown_verb_are_usage_errors(sft):
    assert sft().returncode == 2
    result = sft("prepair")
    assert result.returncode == 2 and "did you mean 'prepare'" in result.stderr


def test_verb_help_and_cfg_job(sft):
    result = sft("prepare", "--help")
    assert result.returncode == 0 and "max_seq_len" in result.stdout
    result = sft("prepare", "recipe=demo", "--cfg", "job")
    assert result.returncode == 0 and "run_dir: runs/demo" in result.stdout


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_composes(sft, recipe):
    result = sft("prepare", f"recipe={recipe}", "--cfg", "job", "--resolve")
    assert result.returncode == 0, result.stderr
    assert "name_or_path:" in result.stdout


def test_precedence_schema_group_recipe_cli(sft, tmp_path):
    recipe = tmp_path / "mine.yaml"  # no @package header: it is added for the user
    recipe.write_text("defaults:\n  - override /peft: none\nseed: 7\nmax_seq_len: 300\n"
                      "model: {name_or_path: some/model}\n")
    result = sft("prepare", f"recipe={recipe}", "max_seq_len=512", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "seed: 7" in out            # recipe beats schema default (42)
    assert "max_seq_len: 512" in out   # command line beats recipe
    assert "method: none" in out       # recipe picked a config group
    assert "micro_batch_size: 4" in out  # schema default survives


@pytest.mark.parametrize("override, key", [
    ("data.los_on=all", "data.los_on"),         # caught with a did-you-mean
    ("data.loss_on=everything", "data.loss_on"),  # enum value
    ("seed=abc", "seed"),                        # wrong type
    ("trainer.foo=1", "trainer.foo"),
])
def test_config_errors_exit_2_and_name_the_key(sft, override, key):
    result = sft("prepare", "recipe=demo", override)
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_recipe_and_missing_mandatory(sft, tmp_path):
    result = sft("prepare", "recipe=nope")
    assert result.returncode == 2 and "known recipes" in result.stderr
    result = sft("prepare", f"run_dir={tmp_path}")
    assert result.returncode == 2 and "model.name_or_path" in result.stderr


def test_unbuilt_verbs_say_so(sft):
    for verb in ("pack", "train", "evaluate", "merge-lora"):
        module = {"pack": "sft_cli/data/pack.py", "train": "sft_cli/train.py", "evaluate": "sft_cli/evaluate.py",
                  "merge-lora": "sft_cli/merge.py"}[verb]
        if (Path(__file__).resolve().parent.parent / module).exists():
            continue
        result = sft(verb, "recipe=demo")
        assert result.returncode == 2 and "not implemented yet" in result.stderr


def test_python_dash_m_and_console_script_agree(sft):
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "sft"
    if not exe.exists():
        pytest.skip("console script not installed next to this python")
    a = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert a.returncode == 0 and "merge-lora" in a.stdout


def test_lima_recipe_offline_fails_clearly(sft, tmp_path):
    result = sft("prepare", "recipe=lima-1k", f"run_dir={tmp_path}", timeout=120)
    assert result.returncode == 1
    assert "Offline?" in result.stderr and "Traceback" not in result.stderr
