"""Security properties of the CLI: no code runs unless the user's recipe asks for it, no unsafe
deserialisation, no path escapes through crafted names, clear errors for missing paths.

What is tested:
  * trust_remote_code: off by default, never hard-coded on (AST scan of sft_cli), never turned on
    by recipes/ or conf/; and a model folder whose config.json / tokenizer_config.json points
    `auto_map` at a module that writes a sentinel file on import is refused (`sft prepare`,
    `sft train`) with a message naming trust_remote_code, and the sentinel is never written;
  * AST scan of sft_cli: torch.load only with weights_only=True; no eval/exec, pickle-family
    loads, unsafe yaml loads, hydra instantiate, shell=True;
  * config files are data: a recipe (or override) with a `_target_` anywhere, hydra.callbacks,
    hydra.searchpath, hydra/ group choices or a python YAML tag is refused (exit 2) before
    anything is instantiated; a saved run config.yaml still works as a recipe;
  * sweep point folders stay inside the sweep's run_dir whatever the swept values hold; source
    names (`data.sources[i].name`) are labels, never paths;
  * a missing recipe or data path is a clear error naming the path, without a traceback.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sft_cli import cli
from sft_cli.config import SFTConfig, to_yaml
from sft_cli.sweep import point_name
from tests.conftest import REPO, write_chat_jsonl
from tests.reliability.test_config_fuzz import assert_config_error, run_cli

pytestmark = pytest.mark.reliability

SOURCES = sorted((REPO / "sft_cli").rglob("*.py"))
CONFIG_FILES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "conf").rglob("*.yaml"))


def flat(text: str) -> str:
    return " ".join(text.split())


def record(record_property, trials: int, passes: int) -> None:
    record_property("trials", trials)
    record_property("passes", passes)


# ---- trust_remote_code ----------------------------------------------------------------------


def test_trust_remote_code_defaults_off():
    assert SFTConfig().model.trust_remote_code is False


def _literal_true_remote_code(tree: ast.AST) -> list[int]:
    """Lines passing trust_remote_code=True as a keyword or a dict literal entry."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            if isinstance(node.value, ast.Constant) and node.value.value is True:
                lines.append(node.value.lineno)
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" \
                        and isinstance(value, ast.Constant) and value.value is True:
                    lines.append(key.lineno)
    return lines


def test_no_source_hard_codes_trust_remote_code(record_property):
    found = {p: _literal_true_remote_code(ast.parse(p.read_text())) for p in SOURCES}
    offenders = [f"{p.relative_to(REPO)}:{line}" for p, lines in found.items() for line in lines]
    record(record_property, len(SOURCES), sum(not lines for lines in found.values()))  # a trial per module
    assert not offenders


def _values_of(node, name: str) -> list:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == name] + [x for v in node.values() for x in _values_of(v, name)]
    if isinstance(node, list):
        return [x for v in node for x in _values_of(v, name)]
    return []


def test_no_recipe_or_conf_turns_on_remote_code(record_property):
    offenders = [str(p) for p in CONFIG_FILES
                 if any(v not in (False, None, "false") for v in _values_of(yaml.safe_load(p.read_text()),
                                                                         "trust_remote_code"))]
    record(record_property, len(CONFIG_FILES), len(CONFIG_FILES) - len(offenders))
    assert not offenders


def _booby_trapped_model(tiny_dir, root: Path, part: str) -> tuple[Path, Path]:
    """A copy of the tiny model whose `part` (tokenizer or model) needs its own code: a module
    that writes `sentinel` when imported. transformers copies such modules to its cache before
    importing them, so the module writes an absolute path."""
    model, sentinel = root / "model", root / "SENTINEL"
    shutil.copytree(tiny_dir(), model)
    (model / "remote_code.py").write_text(
        f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('remote code ran')\n"
        "from transformers import PreTrainedTokenizerFast, PretrainedConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast): pass\n"
        "class EvilConfig(PretrainedConfig): model_type = 'evil_llama'\n")
    if part == "tokenizer":
        config = json.loads((model / "tokenizer_config.json").read_text())
        config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "remote_code.EvilTokenizer"]})
        (model / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        config = json.loads((model / "config.json").read_text())
        config.update(model_type="evil_llama", auto_map={"AutoConfig": "remote_code.EvilConfig",
                                                         "AutoModelForCausalLM": "remote_code.EvilModel"})
        (model / "config.json").write_text(json.dumps(config))
    return model, sentinel


@pytest.mark.parametrize("part, verb", [("tokenizer", "prepare"), ("model", "train")])
def test_auto_map_code_is_never_run(tiny_dir, tmp_path, sft, part, verb, record_property):
    model, sentinel = _booby_trapped_model(tiny_dir, tmp_path, part)
    data = write_chat_jsonl(tmp_path / "chat.jsonl", rows=20)
    result = sft(verb, f"model.name_or_path={model}", f"data.sources=[{{path: {data}}}]",
                 f"run_dir={tmp_path / 'run'}", "max_seq_len=128", "trainer.max_steps=1", timeout=300)
    checks = [not sentinel.exists(), result.returncode != 0, "trust_remote_code" in flat(result.stderr),
              "Traceback" not in result.stderr]
    record(record_property, len(checks), sum(checks))
    assert not sentinel.exists(), "the model folder's own code was imported"
    assert result.returncode != 0, result.stderr[-2000:]
    assert "trust_remote_code" in flat(result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# ---- unsafe calls in the source -------------------------------------------------------------

BANNED_CALLS = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "dill.load", "dill.loads",
                "cloudpickle.load", "cloudpickle.loads", "marshal.load", "marshal.loads", "shelve.open",
                "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "pandas.read_pickle", "pd.read_pickle",
                "hydra.utils.instantiate", "hydra.utils.call", "instantiate", "os.system", "os.popen"}
BANNED_MODULES = {"pickle", "dill", "cloudpickle", "marshal", "shelve"}  # importing them is fine (exception types)
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "yaml.SafeLoader", "yaml.CSafeLoader"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(tree: ast.AST) -> tuple[int, list[str]]:
    """(calls inspected, problems as 'line: why') for one module."""
    inspected, problems = 0, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):  # `from pickle import loads` would hide the call's module
            names = {a.name for a in node.names}
            if (node.module in BANNED_MODULES and names & {"load", "loads", "Unpickler", "open"}) \
                    or (node.module == "hydra.utils" and names & {"instantiate", "call"}):
                problems.append(f"{node.lineno}: imports {sorted(names)} from {node.module}")
        if not isinstance(node, ast.Call):
            continue
        inspected += 1
        name = _dotted(node.func)
        if name in BANNED_CALLS:
            problems.append(f"{node.lineno}: calls {name}")
        if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            problems.append(f"{node.lineno}: torch.load without weights_only=True")
        if name == "yaml.load" and _dotted(_keyword(node, "Loader") or ast.Constant(None)) not in SAFE_YAML_LOADERS:
            problems.append(f"{node.lineno}: yaml.load without a SafeLoader")
        if name in ("np.load", "numpy.load") and _is_true(_keyword(node, "allow_pickle")):
            problems.append(f"{node.lineno}: np.load(allow_pickle=True)")
        if _is_true(_keyword(node, "shell")):
            problems.append(f"{node.lineno}: shell=True")
    return inspected, problems


PLANTED = ["from pickle import loads", "from hydra.utils import instantiate", "torch.load(f)",
           "torch.load(f, weights_only=False)", "yaml.load(s)", "yaml.load(s, Loader=yaml.FullLoader)", "eval(x)",
           "subprocess.run(c, shell=True)", "np.load(f, allow_pickle=True)"]


def test_the_scanner_catches_what_it_looks_for(trials):
    """A scanner that finds nothing proves nothing unless it finds planted problems.

    A trial per planted problem (9 unsafe calls, 2 literal trust_remote_code), one for a clean module."""
    module = ast.parse("\n".join(PLANTED))
    found = {int(problem.split(":")[0]) for problem in unsafe_calls(module)[1]}
    for line, code in enumerate(PLANTED, start=1):
        with trials.trial(code):
            assert line in found, f"not caught: {code}"
    remote = ["foo(trust_remote_code=True)", "d = {'trust_remote_code': True}"]
    for line, code in enumerate(remote, start=1):
        with trials.trial(code):
            assert _literal_true_remote_code(ast.parse("\n".join(remote))).count(line) == 1, f"not caught: {code}"
    with trials.trial("a clean module"):
        assert unsafe_calls(ast.parse("torch.load(f, weights_only=True)\nyaml.load(s, Loader=yaml.SafeLoader)\n"
                                      "model.eval()\nre.compile(p)\n"))[1] == []
    trials.check()
    assert len(unsafe_calls(module)[1]) == len(PLANTED)  # one problem each, nothing counted twice


# The one place that runs code on purpose: `sft generate`'s sandbox child (verify.py) compiles and execs
# the model-written program, inside its own rlimited, audited subprocess. Only those two calls, only there.
SANDBOX_EXEC = ("sft_cli/verify.py", "_child_main", {"calls exec", "calls compile"})


def _sandbox_lines(tree: ast.AST) -> range:
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == SANDBOX_EXEC[1])
    return range(function.lineno, function.end_lineno + 1)


def test_no_unsafe_deserialisation_or_dynamic_code(record_property):
    inspected, offenders, clean, exempted = 0, [], 0, []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        calls, problems = unsafe_calls(tree)
        if str(path.relative_to(REPO)) == SANDBOX_EXEC[0]:
            lines = _sandbox_lines(tree)
            exempted = [p for p in problems if int(p.split(":")[0]) in lines and p.split(": ", 1)[1] in SANDBOX_EXEC[2]]
            problems = [p for p in problems if p not in exempted]
        inspected += calls
        clean += not problems
        offenders += [f"{path.relative_to(REPO)}:{p}" for p in problems]
    record(record_property, len(SOURCES), clean)  # a trial per module
    record_property("calls_inspected", inspected)
    assert not offenders, offenders
    assert len(exempted) == 2, f"the sandbox exemption is stale: {exempted}"  # exec + compile, nothing else


# ---- config files are data ------------------------------------------------------------------


def _open_payload(sentinel: Path) -> dict:
    """A Hydra-instantiable node that creates `sentinel` (open(path, 'w')) when instantiated."""
    return {"_target_": "builtins.open", "_args_": [str(sentinel), "w"]}


def test_the_payload_is_live(tmp_path):
    """Control: instantiating the payload does create the file, so its absence below means something."""
    from hydra.utils import instantiate

    instantiate(_open_payload(tmp_path / "control")).close()
    assert (tmp_path / "control").exists()


def test_recipe_with_a_callback_target_is_refused(tmp_path, sft, record_property):
    sentinel = tmp_path / "SENTINEL"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(yaml.safe_dump({"hydra": {"callbacks": {"evil": _open_payload(sentinel)}},
                                      "model": {"name_or_path": "builtin:tiny-llama-chatml"}}))
    result = sft("prepare", f"recipe={recipe}", f"run_dir={tmp_path / 'run'}", timeout=120)
    checks = [result.returncode == 2, not sentinel.exists(), "Traceback" not in result.stderr,
              "hydra.callbacks.evil._target_" in flat(result.stderr)]
    record(record_property, len(checks), sum(checks))
    assert all(checks), result.stderr


def _recipes(sentinel: Path) -> dict[str, tuple[str, str]]:
    """Recipe texts that would reach code -> the key the refusal must name."""
    payload = _open_payload(sentinel)
    return {
        "nested _target_": (yaml.safe_dump({"data": {"sources": [{"path": "x.jsonl", "columns": payload}]}}),
                            "data.sources[0].columns._target_"),
        "hydra.callbacks": (yaml.safe_dump({"hydra": {"callbacks": {"evil": payload}}}), "hydra.callbacks.evil._target_"),
        "hydra.searchpath": (yaml.safe_dump({"hydra": {"searchpath": [f"file://{sentinel.parent}"]}}),
                             "hydra.searchpath"),
        "hydra/ group": ("defaults:\n  - override hydra/launcher: basic\n", "defaults[0]"),
        "python tag": (f"seed: !!python/object/apply:builtins.open [{str(sentinel)!r}, w]\n", "recipe"),
        "not a mapping": ("- a\n- b\n", "recipe"),
    }


@pytest.mark.parametrize("case", list(_recipes(Path("/x"))))
def test_recipes_that_reach_code_are_refused(tmp_path, case):
    sentinel = tmp_path / "SENTINEL"
    text, key = _recipes(sentinel)[case]
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(text)
    outcome = run_cli(f"recipe={recipe}", f"run_dir={tmp_path / 'run'}")
    assert_config_error(outcome, key)
    assert not sentinel.exists()


def test_command_line_targets_are_refused(tmp_path, trials):
    sentinel = tmp_path / "SENTINEL"
    cases = [(f"+hydra.callbacks.evil={{_target_: builtins.open, _args_: ['{sentinel}', w]}}", "hydra.callbacks.evil"),
             ("+hydra.callbacks.evil._target_=builtins.print", "hydra.callbacks.evil._target_"),
             ("data.sources=[{path: x.jsonl, columns: {_target_: builtins.open}}]", "data.sources")]
    for override, key in cases:
        with trials.trial(override):
            assert_config_error(run_cli("recipe=demo", f"run_dir={tmp_path / 'run'}", override), key)
            assert not sentinel.exists()
    trials.check()


def test_saved_run_config_and_shipped_configs_still_load(tmp_path, trials):
    """The refusal must not catch what is legitimately passed as a recipe."""
    cfg = SFTConfig(run_dir=str(tmp_path / "orig"), seed=7)
    cfg.model.name_or_path = "builtin:tiny-llama-chatml"
    saved = tmp_path / "orig" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(to_yaml(cfg))  # what every run writes to run_dir/config.yaml
    with trials.trial("a saved run config.yaml"):
        outcome = run_cli(f"recipe={saved}", f"run_dir={tmp_path / 'replay'}")
        assert outcome.code == 0 and outcome.ran[0].seed == 7, outcome.err
    shipped = [p for p in CONFIG_FILES if p != REPO / "conf" / "config.yaml"]  # the primary config is ours
    for path in shipped:
        with trials.trial(str(path.relative_to(REPO))):
            cli._refuse_code_in_recipe(path, path.read_text())  # raises ConfigError if refused
    trials.check()


# ---- paths: sweep points and source names ---------------------------------------------------

NASTY_VALUES = ["../../x", "/abs", "..", ".", "a\x00b", "line\nbreak", "tab\there", "..\\..\\x", "a/../../b",
                "~", "$HOME", "", " ", "\x7f"]


def _inside(root: Path, name: str) -> bool:
    return "\x00" not in name and len(Path(name).parts) == 1 and (root / name).resolve().parent == root.resolve()


def test_point_names_stay_one_folder_inside_run_dir(tmp_path, record_property):
    counts = {"trials": 0, "passes": 0}

    @settings(max_examples=200, deadline=None)
    @given(values=st.lists(st.one_of(st.sampled_from(NASTY_VALUES), st.text()), min_size=1, max_size=3))
    def check(values):
        counts["trials"] += 1
        keys = [f"k{i}" for i in range(len(values))]
        name = point_name([f"{k}={v}" for k, v in zip(keys, values)], keys)
        assert _inside(tmp_path, name), repr(name)
        assert not any(ord(ch) < 32 for ch in name), repr(name)
        counts["passes"] += 1

    try:
        check()
    finally:
        record(record_property, counts["trials"], counts["passes"])


def test_swept_values_cannot_move_a_point_out_of_the_sweep(tmp_path, trials):
    """The real join (cli._name_sweep_point) through a real -m sweep, with the verb stubbed."""
    root = tmp_path / "sweep"
    outcome = run_cli("-m", "recipe=demo", f"run_dir={root}", "data.chat_template=../../x,/abs,..,'a\nb'")
    assert outcome.code == 0, outcome.err
    run_dirs = [Path(cfg.run_dir) for cfg in outcome.ran]
    for run_dir in run_dirs:
        with trials.trial(repr(run_dir.name)):
            assert run_dir.resolve().parent == root.resolve(), run_dir
    trials.check()
    assert len(run_dirs) == 4


def test_source_names_are_labels_not_paths(tiny_dir, tmp_path, sft, record_property):
    """data.sources[i].name lands in reports and the `source` column; no file is named after it."""
    data = write_chat_jsonl(tmp_path / "work" / "chat.jsonl", rows=20)
    names = ["../../evil", f"{tmp_path}/evil-abs"]  # relative to run_dir or the cwd; absolute
    sources = ", ".join(f"{{path: '{data}', name: '{n}'}}" for n in names)
    run_dir = tmp_path / "work" / "run"
    before = set(tmp_path.rglob("*"))
    result = sft("prepare", "model.name_or_path=builtin:tiny-llama-chatml", f"data.sources=[{sources}]",
                 f"run_dir={run_dir}", "max_seq_len=128", "data.dedupe=false", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    created = set(tmp_path.rglob("*")) - before
    outside = [p for p in created if run_dir not in p.parents and p != run_dir]
    report = json.loads((run_dir / "prepared" / "report.json").read_text())
    escapes = [tmp_path / "evil", Path(REPO, names[0]).resolve(), Path(names[1])]
    checks = [not outside, not any(p.exists() for p in escapes), all(n in json.dumps(report) for n in names)]
    record(record_property, len(checks), sum(checks))
    assert not outside, outside
    assert all(checks), report


# ---- missing paths --------------------------------------------------------------------------


def test_missing_recipe_path_is_a_config_error(tmp_path):
    missing = tmp_path / "no" / "such.yaml"
    outcome = run_cli(f"recipe={missing}")
    assert_config_error(outcome, str(missing))


def test_missing_data_path_names_it(tmp_path, sft, record_property):
    missing = tmp_path / "no" / "such.jsonl"
    result = sft("prepare", "model.name_or_path=builtin:tiny-llama-chatml", f"data.sources=[{{path: {missing}}}]",
                 f"run_dir={tmp_path / 'run'}", timeout=300)
    checks = [result.returncode in (1, 2), str(missing) in flat(result.stderr), "Traceback" not in result.stderr]
    record(record_property, len(checks), sum(checks))
    assert all(checks), result.stderr[-2000:]
