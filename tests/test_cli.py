"""The command-line contract: verbs, help, exit codes, recipes, precedence."""

from pathlib import Path

import pytest

from sft_cli.cli import RECIPES_DIR, VERBS


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


def test_every_verb_is_built():
    """Each verb's module exists and has the `run(cfg)` the CLI calls (none says "not implemented")."""
    import importlib

    assert list(VERBS) == ["prepare", "pack", "train", "evaluate", "merge-lora", "generate"]
    for verb, (module, _) in VERBS.items():
        assert callable(getattr(importlib.import_module(module), "run", None)), verb


def test_an_unbuilt_verb_says_so(monkeypatch, capsys):
    """The message a verb gets while its module does not exist yet: exit 2, no traceback."""
    from sft_cli.cli import main

    monkeypatch.setitem(VERBS, "distill", ("sft_cli.no_such_module", "not written yet"))
    monkeypatch.delenv("SFT_COMMAND", raising=False)  # main() sets it; restored after the test
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "recipe=demo"])
    assert exit_.value.code == 2
    assert "sft distill: not implemented yet" in capsys.readouterr().err


@pytest.mark.parametrize("args", [("--help",), ("prepair",), ("prepare", "recipe=demo", "--cfg", "job")],
                         ids=["help", "unknown-verb", "cfg-job"])
def test_python_dash_m_and_console_script_agree(args):
    """`sft ...` (the installed console script) and `python -m sft_cli ...` give the same exit code,
    stdout and stderr."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "sft"
    if not exe.exists():
        pytest.skip("console script not installed next to this python")
    env = {**os.environ, "COLUMNS": "200"}
    script = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=120)
    module = subprocess.run([sys.executable, "-m", "sft_cli", *args], capture_output=True, text=True, env=env,
                            timeout=120)
    assert (script.returncode, script.stdout, script.stderr) == (module.returncode, module.stdout, module.stderr)
    assert script.stdout or script.stderr  # they agree on something, not on nothing


def test_lima_recipe_offline_fails_clearly(sft, tmp_path):
    result = sft("prepare", "recipe=lima-1k", f"run_dir={tmp_path}", timeout=120)
    assert result.returncode == 1
    assert "Offline?" in result.stderr and "Traceback" not in result.stderr


# ---- paths with commas, `=`, spaces, brackets and non-ASCII letters ------------------------------

NASTY_PATHS = ["runs/demo/optim.lr=0.0001,seed=0", "a b/c [1]/d{e}", "dätä/ü,x", "it's a \\ path\\", "~/x#y(z)"]


def _hydra_reads(arg: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(arg).value()


@pytest.mark.parametrize("value", NASTY_PATHS)
def test_hydra_quote_round_trips(value):
    from sft_cli.cli import hydra_quote

    assert _hydra_reads(f"run_dir={hydra_quote(value)}") == value


def test_path_values_reach_hydra_as_one_string(tmp_path):
    from hydra.core.override_parser.types import ChoiceSweep

    from sft_cli.cli import _protect_paths

    folder = tmp_path / "runs, [ü]=1"
    folder.mkdir()
    data = folder / "a,b c.jsonl"
    data.write_text("{}\n")

    def read(*args):
        return {arg.split("=", 1)[0]: _hydra_reads(arg) for arg in _protect_paths(list(args)) if "=" in arg}

    assert read("run_dir=runs/a,b")["run_dir"] == "runs/a,b"  # no -m: a path key holds one path
    assert read("run_dir=runs/demo/optim.lr=0.0001,seed=0")["run_dir"] == "runs/demo/optim.lr=0.0001,seed=0"
    assert read(f"data.chat_template={data}", "model.tokenizer=null") == {"data.chat_template": str(data),
                                                                           "model.tokenizer": None}
    assert isinstance(read("-m", "run_dir=runs/a,runs/b")["run_dir"], ChoiceSweep)  # -m: a sweep over run_dirs
    assert read("-m", f"run_dir={folder}")["run_dir"] == str(folder)  # ... unless the value names a folder
    assert isinstance(read("-m", "optim.lr=1e-4,3e-4")["optim.lr"], ChoiceSweep)
    sources = read(f"data.sources=[{{path: {data}, weight: 1}}, {{path: {data}}}]")["data.sources"]
    assert sources == [{"path": str(data), "weight": 1}, {"path": str(data)}]


def test_staged_recipe_names_are_words_and_unique(tmp_path):
    from sft_cli.cli import _staged_name

    staged: dict = {}
    names = [_staged_name(tmp_path / sub / "config.yaml", staged) for sub in ("a", "b", "a")]
    assert names[0] == names[2] == "config" and names[1] == "config-2"
    assert _staged_name(tmp_path / "my recipe,ü.yaml", staged) == "my_recipe__"
    assert _staged_name(tmp_path / "1e-4.yaml", staged) == "recipe_1e-4"  # not a float to Hydra


def test_a_recipe_and_run_dir_with_commas_compose(sft, tmp_path):
    point = tmp_path / "optim.lr=0.0001,seed=0"  # a default-named sweep point's folder
    point.mkdir()
    (point / "config.yaml").write_text("seed: 7\nmodel: {name_or_path: some/model}\n")
    run_dir = tmp_path / "re play, [ü]=1"
    result = sft("prepare", f"recipe={point / 'config.yaml'}", f"run_dir={run_dir}", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "seed: 7" in result.stdout and f"run_dir: {run_dir}" in result.stdout


def test_an_in_process_run_leaves_no_trace(tmp_path, sft):
    """The test runner (conftest._run_in_process) calls cli.main in this process: a whole `sft train`
    must leave the environment, working directory, signal handlers and torch's global modes as they
    were, or later tests would run in another process state than a user's."""
    import os
    import signal

    import torch

    from tests.conftest import train_args, write_chat_jsonl

    def state():
        return (dict(os.environ), os.getcwd(), signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT),
                torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(), torch.get_rng_state())

    before = state()
    data = write_chat_jsonl(tmp_path / "chat.jsonl", rows=20, max_words=10)
    result = sft(*train_args(data, tmp_path / "run", "trainer.max_steps=1", max_seq_len=128))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 1" in result.stdout + result.stderr  # captured, not printed to the terminal
    after = state()
    assert before[:-1] == after[:-1] and torch.equal(before[-1], after[-1])
