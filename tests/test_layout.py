"""Which module may import which: the layout STYLE.md promises, read from the source with `ast`.

  * config.py is the bottom: it imports nothing of ours but sft_cli.errors, owns every allowed-values
    list, and validate() runs with neither torch nor datasets loaded (checked in a fresh process);
  * cli.py is the only module that imports Hydra;
  * the library never imports a verb module (a CLI verb's `run(cfg)`); verbs import each other only
    where VERB_IMPORTS says.

Imports inside functions count the same as those at the top of a file.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sft_cli"

VERBS = {"sft_cli.train", "sft_cli.evaluate", "sft_cli.merge", "sft_cli.prepare", "sft_cli.pack", "sft_cli.generate"}
# Entry points run the verbs: cli.py by name (importlib), worker.py as one rank of `sft train`.
ENTRY_POINTS = {"sft_cli.cli", "sft_cli.worker", "sft_cli.__main__"}
# The verb -> verb imports there are, each with what it is for; any new one is a layout change.
VERB_IMPORTS = {
    ("sft_cli.pack", "sft_cli.prepare"),  # ensure_prepared: pack runs prepare when needed
    ("sft_cli.train", "sft_cli.pack"),  # ensure_packed before the first step
    ("sft_cli.train", "sft_cli.prepare"),  # load_prepared_tokenizer
    ("sft_cli.evaluate", "sft_cli.pack"),  # ensure_packed for a run never prepared here
    ("sft_cli.evaluate", "sft_cli.prepare"),  # eval.sources prepared like training data; the tokenizer
    ("sft_cli.generate", "sft_cli.prepare"),  # load_prepared_tokenizer: a run's own chat template
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(module: str) -> set[str]:
    """Every module `module` imports: `from sft_cli import prepare` counts as sft_cli.prepare."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return found


def test_the_walk_sees_the_package():
    assert {"sft_cli.config", "sft_cli.cli", *VERBS} <= set(MODULES)
    assert "sft_cli.prepare" in imports_of("sft_cli.pack")  # a lazy `from sft_cli import prepare`


def test_config_imports_nothing_of_ours_but_errors():
    ours = {name for name in imports_of("sft_cli.config") if name.split(".")[0] == "sft_cli"}
    assert ours == {"sft_cli.errors"}


def test_only_cli_imports_hydra():
    importers = {m for m in MODULES if any(name.split(".")[0] == "hydra" for name in imports_of(m))}
    assert importers == {"sft_cli.cli"}


def test_the_library_imports_no_verb_and_verbs_only_the_listed_ones():
    wrong = []
    for module in MODULES:
        if module in ENTRY_POINTS:
            continue
        for verb in sorted(imports_of(module) & VERBS - {module}):
            if (module, verb) not in VERB_IMPORTS:
                wrong.append(f"{module} imports the verb {verb}")
    assert not wrong, "\n".join(wrong)


def test_verb_imports_list_only_imports_that_exist():
    stale = [pair for pair in VERB_IMPORTS if pair[1] not in imports_of(pair[0])]
    assert not stale, f"listed but no longer imported: {stale}"


def test_validate_loads_neither_torch_nor_datasets():
    code = (
        "import json, sys\n"
        "from sft_cli.config import SFTConfig, SourceConfig, validate\n"
        "cfg = SFTConfig()\n"
        "cfg.model.name_or_path = 'some/model'\n"
        "cfg.data.sources = [SourceConfig(path='a.jsonl')]\n"
        "validate(cfg)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert not loaded & {"torch", "datasets", "transformers", "hydra"}
    assert {m for m in loaded if m.startswith("sft_cli")} == {"sft_cli", "sft_cli.config", "sft_cli.errors"}


def test_modules_act_on_exactly_the_names_config_allows():
    """The lists live in config.py; the tables that give the names a meaning cover them, no more."""
    from sft_cli import config, precision, schedule

    assert tuple(precision.DTYPES) == config.DTYPES
    assert tuple(schedule.SCHEDULES) == config.SCHEDULES
