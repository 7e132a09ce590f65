"""`sft VERB [overrides]`: the only module that knows about Hydra.

It turns the command line into one typed `SFTConfig` (schema defaults < conf/
groups < recipe < command line), hands it to the verb's `run(cfg)`, and turns
errors into exit codes: 0 ok, 1 runtime failure, 2 usage or config error.

    sft prepare recipe=demo show=2
    sft prepare recipe=path/to/mine.yaml data.loss_on=all
    sft prepare -m recipe=demo max_seq_len=512,1024 'run_dir=runs/len${max_seq_len}'
"""

from __future__ import annotations

import difflib
import importlib
import importlib.resources
import os
import re
import shlex
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sft_cli.errors import ConfigError, SFTError


def _package_dir(package: str) -> Path:
    """The folder of sft_cli.conf or sft_cli.recipes: conf/ and recipes/ ship as those packages
    (see pyproject.toml), so a wheel install finds them in site-packages and an editable one in
    the checkout. Hydra and glob need a real folder, not a zipped install."""
    return Path(str(importlib.resources.files(package)))


CONF_DIR = _package_dir("sft_cli.conf")
RECIPES_DIR = _package_dir("sft_cli.recipes")

# verb -> (module with `run(cfg) -> int`, one-line description)
VERBS: dict[str, tuple[str, str]] = {
    "prepare": ("sft_cli.prepare", "raw data -> validated, chat-templated, tokenized, loss-masked examples"),
    "pack": ("sft_cli.pack", "examples -> fixed-length packed rows with no cross-example attention"),
    "train": ("sft_cli.train", "LoRA or full fine-tuning: packing, loss masking, NEFTune, exact resume"),
    "evaluate": ("sft_cli.evaluate", "loss/perplexity, generations, forgetting and diversity checks"),
    "merge-lora": ("sft_cli.merge", "fold the LoRA adapter into the base and save a plain HF model"),
    "generate": ("sft_cli.generate", "best-of-N sampling, verified (answer match, unit tests, reward) -> new SFT data"),
}

err_console = Console(stderr=True)


def _print_verbs() -> None:
    table = Table(title="sft VERB [key=value ...]  (sft VERB --help for a verb's config)", show_header=False)
    for verb, (_, description) in VERBS.items():
        table.add_row(f"[bold]{verb}[/]", description)
    Console().print(table)
    Console().print("Examples: sft prepare recipe=demo | sft train recipe=lima-1k optim.lr=1e-5 | -m for sweeps")


def _resolve_recipe(value: str) -> Path:
    """A recipe is a name in recipes/ or a path to a YAML file of the user's own."""
    candidate = Path(value)
    if candidate.suffix in (".yaml", ".yml") or os.sep in value:
        if candidate.is_file():
            return candidate.resolve()
        raise ConfigError("recipe", f"file not found: {value}", "give an existing .yaml path or a name from recipes/")
    named = RECIPES_DIR / f"{value}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(value, known, n=1)
    hint = f"did you mean recipe={close[0]}? " if close else ""
    raise ConfigError("recipe", f"unknown recipe '{value}'", f"{hint}known recipes: {', '.join(known)}")


def _expand_recipe_globs(value: str) -> list[str]:
    """`recipe=glob(*)` / `glob(lima*)`: every matching recipe in recipes/ (a smoke sweep)."""
    import fnmatch

    if not (value.startswith("glob(") and value.endswith(")")):
        return value.split(",")
    patterns = [p.strip() for p in value[5:-1].strip("[]").split(",")]
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    matched = [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in patterns)]
    if not matched:
        raise ConfigError("recipe", f"{value} matches no recipe", f"known recipes: {', '.join(names)}")
    return matched


def _recipe_values(value: str) -> list[str]:
    """The recipes one `recipe=` names. A value that names an existing file (a sweep point's
    config.yaml sits in a folder named `optim.lr=0.0001,seed=0`), a recipe, or is quoted is one
    recipe; otherwise `glob(...)` or a comma list sweeps over several."""
    if _is_quoted(value):
        return [_unquoted(value)]
    if _names_path(value) or (RECIPES_DIR / f"{value}.yaml").is_file():
        return [value]
    return _expand_recipe_globs(value)


def _staged_name(path: Path, staged: dict[Path, str]) -> str:
    """The name a recipe file is staged under: its stem, made a word Hydra's grammar reads as one
    string (no `,` `=` spaces or non-ASCII), and unique (two sweep points' config.yaml must not
    overwrite each other)."""
    if path in staged:
        return staged[path]
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem) or "recipe"
    parsed = _parse(f"recipe={base}")
    if parsed is None or not isinstance(parsed.value(), str):  # `1e-4`, `true`, `null` are not names
        base = f"recipe_{base}"
    name, n = base, 1
    while name in staged.values():
        n += 1
        name = f"{base}-{n}"
    staged[path] = name
    return name


def _stage_recipes(overrides: list[str], workdir: Path) -> list[str]:
    """Copy the chosen recipe file(s) into a Hydra search-path folder `recipe/`.

    Hydra only finds group options by folder name; copying lets `recipe=NAME` and
    `recipe=path/x.yaml` (and sweeps over both) use one mechanism. A user file without
    the `# @package _global_` header gets one, so its keys land at the top level.
    """
    # hydra.sweep.dir: Hydra's own multirun.yaml goes to the temp folder, not the user's cwd.
    staged = [f"hydra.searchpath=[file://{workdir}]", f"hydra.sweep.dir={workdir}/multirun"]
    names: dict[Path, str] = {}
    for arg in overrides:
        if not arg.startswith("recipe="):
            staged.append(arg)
            continue
        chosen = []
        for value in _recipe_values(arg.split("=", 1)[1]):
            path = _resolve_recipe(value.strip())
            text = path.read_text()
            _refuse_code_in_recipe(path, text)
            if "@package _global_" not in text.split("\n", 1)[0]:
                text = "# @package _global_\n" + text
            name = _staged_name(path, names)
            (workdir / "recipe").mkdir(exist_ok=True)
            (workdir / "recipe" / f"{name}.yaml").write_text(text)
            chosen.append(name)
        staged.append("recipe=" + ",".join(chosen))
    return staged


# Keys whose value names a file or folder. Hydra's override grammar reads `,` as a sweep and
# `= [ ] { } ( ) ~ #` and non-ASCII letters as syntax, so such values are quoted for it.
PATH_KEYS = frozenset({"run_dir", "model.name_or_path", "model.tokenizer", "data.chat_template", "eval.model",
                       "eval.prompts", "eval.general_text"})
SOURCE_LIST_KEYS = frozenset({"data.sources", "eval.sources"})
_SOURCE_PATH = re.compile(r"(?<=[{,])\s*path\s*:\s*(?=[^'\"\s])")  # an unquoted `path:` value in a flow map


def _names_path(value: str) -> bool:
    """Whether `value` is an existing file or folder (a name too long, or holding NUL, is not)."""
    try:
        return bool(value) and Path(value).exists()
    except (OSError, ValueError):
        return False


def _is_quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""


def _unquoted(value: str) -> str:
    """A value the user quoted for Hydra (`run_dir='runs/a,b'`), as the path it names."""
    return value[1:-1] if _is_quoted(value) else value


def hydra_quote(value: str) -> str:
    """`value` as one Hydra string literal: single-quoted, its quotes escaped, and backslashes
    doubled where Hydra would halve them (before a quote and at the end)."""
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return f"'{body}'"


def _parse(arg: str):
    """Hydra's reading of one `key=value` override, or None where its grammar refuses it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(arg)
    except HydraException:
        return None


def _path_value(arg: str, value: str, multirun: bool) -> str:
    """A path key's value as Hydra must get it. Quoted when it names an existing file or folder, or
    when it has a `/` and Hydra's grammar cannot read it (`run_dir=runs/demo/optim.lr=0.0001,seed=0`)
    or reads it as a sweep without -m. Left alone: one string already (or null); a sweep under -m
    (`-m run_dir=runs/a,runs/b`); text without a `/` that Hydra refuses (`run_dir=[`), which stays a
    syntax error naming the key; lists and maps, which stay type errors naming it."""
    override = _parse(arg)
    if override is not None and (override.value() is None or isinstance(override.value(), str)):
        return value
    if _names_path(value):
        return hydra_quote(value)
    looks_like_path = "/" in value or os.sep in value
    if looks_like_path and (override is None or (override.is_sweep_override() and not multirun)):
        return hydra_quote(value.strip())
    return value


def _quote_source_paths(value: str) -> str:
    """`[{path: runs/a,b/x.jsonl}]` -> `[{path: 'runs/a,b/x.jsonl'}]`: in a sources list, the longest
    text after an unquoted `path:` (ending before a `,` or `}`) that names an existing file or folder."""
    out, pos = [], 0
    for match in _SOURCE_PATH.finditer(value):
        start = match.end()
        if start < pos:
            continue
        end = next((i for i in range(len(value) - 1, start, -1)
                    if value[i] in ",}" and _names_path(value[start:i].strip())), None)
        if end is not None:
            out += [value[pos:start], hydra_quote(value[start:end].strip())]
            pos = end
    return "".join(out) + value[pos:]


def _is_multirun(args: list[str]) -> bool:
    flags, positional = _split_flags(args)
    return any(f in ("-m", "--multirun") for f in flags) or any(
        arg.startswith(("hydra.mode=MULTIRUN", "+sweep=")) for arg in positional)


def _protect_paths(args: list[str]) -> list[str]:
    """Hydra overrides with every path value quoted so it arrives as one string (README: Sweeps).

    The rule: a value that names an existing file or folder is one path, never a sweep or a list;
    so is one with a `/` that Hydra's grammar cannot read, or reads as a sweep without -m."""
    multirun = _is_multirun(args)
    flags, positional = _split_flags(args)
    out = []
    for arg in positional:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in PATH_KEYS:
            arg = f"{key}={_path_value(arg, value, multirun)}"
        elif sep and key in SOURCE_LIST_KEYS and _parse(arg) is None:
            arg = f"{key}={_quote_source_paths(value)}"
        out.append(arg)
    return [*flags, *out]


def _saved_run_as_recipe(verb: str, overrides: list[str]) -> list[str]:
    """`sft evaluate run_dir=DIR` / `sft merge-lora run_dir=DIR`: with no recipe given, the run's
    saved config.yaml is the recipe, so no other flag is needed."""
    if verb not in ("evaluate", "merge-lora", "generate") or any(arg.startswith("recipe=") for arg in overrides):
        return overrides
    run_dirs = [arg.split("=", 1)[1] for arg in overrides if arg.startswith("run_dir=")]
    run_dir = _unquoted(run_dirs[-1]) if run_dirs else ""
    if run_dir and (Path(run_dir) / "config.yaml").is_file():
        return [f"recipe={Path(run_dir) / 'config.yaml'}", *overrides]
    return overrides


def _model_from_gen(verb: str, overrides: list[str]) -> list[str]:
    """`sft generate gen.model=Qwen/Qwen3-8B gen.prompts=...` with no recipe and no model.name_or_path:
    the model that samples is the model (its tokenizer, dtype and attention settings come from there)."""
    if verb != "generate" or any(arg.startswith(("recipe=", "model.name_or_path=")) for arg in overrides):
        return overrides
    given = [arg.split("=", 1)[1] for arg in overrides if arg.startswith("gen.model=")]
    return [f"model.name_or_path={given[-1]}", *overrides] if given else overrides


def _schema_keys() -> list[str]:
    """Every dotted key of the schema (data.sources entries are checked by Hydra itself)."""
    from dataclasses import fields, is_dataclass

    from sft_cli.config import SFTConfig

    def walk(cls, prefix: str):
        for f in fields(cls):
            key = f"{prefix}{f.name}"
            yield key
            default = f.default_factory() if callable(f.default_factory) else f.default
            if is_dataclass(default):
                yield from walk(type(default), key + ".")

    return list(walk(SFTConfig, ""))


# Flags of Hydra's command line that take the next argument as their value.
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name",
               "-cn", "--config-dir", "-cd", "--experimental-rerun")


def _split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(flags with their values, key=value overrides): argparse takes one run of positionals."""
    flags, positional, rest = [], [], iter(args)
    for arg in rest:
        if arg.startswith("-"):
            flags.append(arg)
            if arg in VALUE_FLAGS:
                flags.append(next(rest, ""))
        else:
            positional.append(arg)
    return flags, positional


def _config_groups() -> set[str]:
    """Names that select a config file rather than set a value: conf/ folders and recipe."""
    # Not __pycache__: conf/ is a package (its __init__.py makes it importable), compiled on install.
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")} | {"recipe"}


def _check_override_keys(overrides: list[str]) -> None:
    """Catch command-line key mistakes before Hydra does, naming the key, with a did-you-mean fix.

    The schema is closed: `+key=` may only add a config group (`+sweep=NAME`), `~key` may only
    drop one, and no override may name `_target_` (Hydra would import and call it)."""
    keys = _schema_keys()
    groups = _config_groups()
    for arg in _split_flags(overrides)[1]:
        if arg.startswith("recipe="):
            continue
        raw_key = arg.split("=", 1)[0]
        prefix = raw_key[: len(raw_key) - len(raw_key.lstrip("+~"))]
        key = raw_key[len(prefix):]
        if not key:
            raise ConfigError(arg, "has no key before '='", "write KEY=VALUE, e.g. seed=1")
        if "_target_" in key.split("."):
            raise ConfigError(key, "names _target_: config may not choose code to run", "remove this override")
        group = key.split("@")[0]
        if key.startswith(("hydra.", "hydra/")) or group in groups:
            continue  # Hydra's own keys and config groups: Hydra checks these itself
        if "=" not in arg and prefix != "~":
            raise ConfigError(key, "has no value", f"write {key}=VALUE")
        if "[" in key and key.split("[")[0] in keys:
            base = key.split("[")[0]
            raise ConfigError(key, "cannot be set by index on the command line",
                              f"set the whole list: {base}=[{{path: a.jsonl, weight: 0.5}}, ...]")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=2, cutoff=0.6)
            fix = f"did you mean {' or '.join(close)}?" if close else "see every key with `sft VERB --cfg job`"
            raise ConfigError(key, "is not a config key", fix)
        if prefix == "+":
            raise ConfigError(key, "is already a config key: '+' would add it again", f"set it with {key}=...")
        if prefix == "~":
            raise ConfigError(key, "is part of the schema and cannot be deleted", f"set it instead: {key}=...")


def _check_override_syntax(hydra_args: list[str]) -> None:
    """Parse every override with Hydra's own grammar first: its parse errors do not name the key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in _split_flags(hydra_args)[1]:
        key = arg.split("=", 1)[0].lstrip("+~") or arg
        try:
            override = parser.parse_override(arg)
        except HydraException as exc:
            raise ConfigError(key, f"cannot parse '{arg}': {str(exc).splitlines()[0]}",
                              "quote values with special characters, e.g. key='a,b' (shell: \"key='a,b'\")") from None
        if _target_paths(_literal_values(override)):
            raise ConfigError(key, "sets a _target_: config may not choose code to run", "remove the _target_ key")


def _literal_values(override):
    """The values an override spells out: its value, or a choice sweep's options. Range and glob
    sweeps are left alone (numbers or names; expanding a range could take any amount of memory)."""
    from hydra.core.override_parser.types import ChoiceSweep

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    return [] if override.is_sweep_override() else value


def _target_paths(node, prefix: str = "") -> list[str]:
    """Dotted paths of every `_target_` key inside a parsed YAML/override value."""
    found = []
    if isinstance(node, dict):
        for name, value in node.items():
            path = f"{prefix}.{name}" if prefix else str(name)
            if name == "_target_":
                found.append(path)
            found += _target_paths(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _target_paths(value, f"{prefix}[{i}]")
    return found


def _refuse_code_in_recipe(path: Path, text: str) -> None:
    """A recipe is data: refuse anything that would make Hydra import and call code.

    `_target_` is how Hydra names a callable to instantiate (callbacks, launchers, sweepers), and
    hydra.callbacks / hydra.searchpath / hydra/ group choices are how a config file reaches it;
    all are refused before Hydra composes anything. Parsed with yaml.safe_load (no python tags)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("recipe", f"{path} is not valid YAML: {' '.join(str(exc).split())[:300]}",
                          "fix the file (yaml.safe_load must read it)") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError("recipe", f"{path} holds a {type(data).__name__}, not a mapping of keys",
                          "write key: value lines, e.g. seed: 1")
    hydra_node = data.get("hydra") if isinstance(data.get("hydra"), dict) else {}
    refused = _target_paths(data) + [f"hydra.{k}" for k in ("callbacks", "searchpath") if k in hydra_node]
    for i, entry in enumerate(data.get("defaults") or []):
        names = entry.keys() if isinstance(entry, dict) else [entry]
        if any("hydra/" in str(name) for name in names):
            refused.append(f"defaults[{i}]")
    if refused:
        raise ConfigError(refused[0], f"in recipe {path}: a recipe may not configure code to run "
                          "(_target_, hydra.callbacks, hydra.searchpath, hydra/ groups)", "remove it from the recipe")


def _config_error_from_omegaconf(exc: Exception) -> ConfigError:
    key = getattr(exc, "full_key", None) or "config"
    message = str(exc).split("\n")[0]
    if "missing mandatory value" in message.lower():
        return ConfigError(key, "is required but not set", f"set it in the recipe or pass {key}=...")
    return ConfigError(key, message, "check the key name and type with `sft VERB --cfg job`")


def _run_verb(verb: str, cfg_node, overrides: list[str]) -> dict:
    """Hydra task function body: typed config in, {run_dir, exit_code, error} out. Never raises.
    In a sweep each point gets its own run_dir, named from its swept values (see sweep.py)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from sft_cli.config import validate

    outcome = {"run_dir": None}

    def body() -> int:
        try:
            _name_sweep_point(cfg_node, overrides)
            cfg = OmegaConf.to_object(cfg_node)  # a typed SFTConfig: nothing below sees Hydra or OmegaConf
        except OmegaConfBaseException as exc:
            raise _config_error_from_omegaconf(exc) from None
        outcome["run_dir"] = cfg.run_dir  # set first: a failed sweep point is still recorded under its folder
        validate(cfg)  # every verb: nothing runs on an out-of-range or unknown-choice value
        return int(importlib.import_module(VERBS[verb][0]).run(cfg) or 0)

    code = guarded(body)
    return {**outcome, "exit_code": code, "error": LAST_ERROR[0] if code else ""}


def swept_keys(overrides: list[str]) -> list[str]:
    """Keys whose command-line value lists several points (a,b / glob(...) / range(...)), read with
    Hydra's own grammar: a quoted path with commas in it or a list of sources is one value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    keys = []
    for arg in overrides:
        if "=" not in arg or arg.startswith(("hydra.", "-")):
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue  # the command line was checked before any job ran; nothing to name a point by
        if override.is_sweep_override():
            keys.append(override.key_or_group)
    return keys


def _is_sweep_point() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _point_keys(overrides: list[str]) -> list[str]:
    """The keys this sweep varies: swept on the command line, or in a saved sweep (+sweep=NAME lists
    them under hydra.sweeper.params)."""
    from hydra.core.hydra_config import HydraConfig

    swept = swept_keys(overrides)
    return swept + [key for key in HydraConfig.get().sweeper.get("params") or {} if key not in swept]


def _point_values(overrides: list[str]) -> dict[str, str]:
    """This sweep point's value of each swept key, as its job's overrides spell them."""
    from hydra.core.hydra_config import HydraConfig

    values = dict(arg.lstrip("+").split("=", 1) for arg in HydraConfig.get().overrides.task if "=" in arg)
    return {key: values[key] for key in _point_keys(overrides) if key in values}


def _name_sweep_point(cfg_node, overrides: list[str]) -> None:
    """In a sweep, this point's run_dir: sweep.point_run_dir from the swept keys and this job's values."""
    from hydra.core.hydra_config import HydraConfig

    from sft_cli.sweep import point_run_dir

    if not _is_sweep_point():
        return
    cfg_node.run_dir = point_run_dir(cfg_node.run_dir, _point_keys(overrides), list(HydraConfig.get().overrides.task),
                                     overrides)


LAST_ERROR = [""]  # the last error line guarded() printed: a failed sweep point records it


def quiet_libraries() -> None:
    import warnings

    import datasets
    import transformers

    # tqdm bars off: long `datasets` work shows rich bars instead (console.datasets_progress).
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter


def guarded(body) -> int:
    """Run `body() -> exit code`, turning errors into messages and exit codes (never a traceback).
    Workers of a multi-process job prefix their messages with their rank."""
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    try:
        quiet_libraries()
        return body()
    except ConfigError as exc:
        err_console.print(f"{rank}[bold red]config error[/] {escape(str(exc))}")
        LAST_ERROR[0] = str(exc).splitlines()[0]
        return exc.exit_code
    except SFTError as exc:
        err_console.print(f"{rank}[bold red]error[/] {escape(str(exc))}")
        LAST_ERROR[0] = str(exc).splitlines()[0]
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print(f"{rank}[yellow]interrupted[/]")
        return 130
    except OSError as exc:  # the machine, not us: disk full, permissions, a file gone (errno says which)
        where = f" ({exc.filename})" if exc.filename else ""
        LAST_ERROR[0] = f"{exc.strerror or exc}{where}"
        err_console.print(f"{rank}[bold red]error[/] {escape(LAST_ERROR[0])}")
        return 1
    except Exception as exc:  # a bug of ours, or a peer rank that died: say so, keep the traceback out of the way
        log = Path(tempfile.gettempdir()) / f"sft-error{'-rank' + os.environ['RANK'] if rank else ''}.log"
        log.write_text(traceback.format_exc())
        LAST_ERROR[0] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        err_console.print(f"{rank}[bold red]internal error[/] {type(exc).__name__}: {escape(str(exc)[:500])}\n"
                          f"  traceback: {log}")
        return 1


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    from sft_cli.assets import asset_path

    # ${asset:data/x.jsonl}: a file shipped inside the package, so recipes work from any directory.
    OmegaConf.register_new_resolver("asset", asset_path, replace=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_verbs()
        sys.exit(0 if argv else 2)
    verb, overrides = argv[0], argv[1:]
    os.environ["SFT_COMMAND"] = shlex.join(["sft", *argv])  # provenance; inherited by worker ranks
    if verb not in VERBS:
        close = difflib.get_close_matches(verb, list(VERBS), n=1)
        err_console.print(f"[bold red]usage error[/] unknown verb '{verb}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        _print_verbs()
        sys.exit(2)
    module_name = VERBS[verb][0]
    if importlib.util.find_spec(module_name) is None:
        err_console.print(f"[bold red]sft {verb}[/]: not implemented yet")
        sys.exit(2)

    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig

    from sft_cli import sweep
    from sft_cli.config import SFTConfig

    ConfigStore.instance().store(name="sft_schema", node=SFTConfig)
    _register_resolvers()
    workdir = Path(tempfile.mkdtemp(prefix="sft-recipes-"))
    exit_codes: list[int] = []
    points: list[dict] = []  # a sweep's points as they finish: {overrides, run_dir, exit_code, error}
    saved_argv = sys.argv
    try:
        try:
            overrides = _model_from_gen(verb, _saved_run_as_recipe(verb, overrides))
            _check_override_keys(overrides)
            hydra_args = _protect_paths(_stage_recipes(overrides, workdir))
            _check_override_syntax(hydra_args)
        except ConfigError as exc:
            err_console.print(f"[bold red]config error[/] {escape(str(exc))}")
            sys.exit(2)

        # Flags (-m, --cfg job, --help) before the overrides: argparse takes one run of positionals.
        flags, positional = _split_flags(hydra_args)

        @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
        def task(cfg) -> dict:
            outcome = _run_verb(verb, cfg, positional)  # as Hydra read them: a quoted path is no sweep
            exit_codes.append(outcome["exit_code"])
            if _is_sweep_point():
                points.append({"overrides": list(HydraConfig.get().overrides.task),
                               "swept": _point_values(positional), **outcome})
            return outcome

        sys.argv = [f"sft {verb}", *flags, f"hydra.job.name=sft-{verb}", *positional]
        try:
            task()
            if points:  # every point ran (a failed one is recorded, not raised): summarise the sweep
                sweep.summarise(points)
        except SystemExit as exc:
            # Hydra exits 1 on composition errors (unknown key, bad type, missing recipe),
            # which happen before any task ran: those are config errors, exit 2.
            code = exc.code if isinstance(exc.code, int) else 1
            sys.exit(2 if code == 1 and not exit_codes else code)
        except Exception as exc:  # raised by Hydra outside its own reporting (e.g. a bad hydra.mode)
            kind = "error" if exit_codes else "config error"
            err_console.print(f"[bold red]{kind}[/] {type(exc).__name__}: {escape(str(exc)[:500])}")
            sys.exit(1 if exit_codes else 2)
    finally:
        sys.argv = saved_argv  # main() may be called again in-process (tests): leave no trace
        _clear_hydra()
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(max(exit_codes, default=0))


def _clear_hydra() -> None:
    """Hydra clears its global state itself, except when it fails before or while starting."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()


if __name__ == "__main__":
    main()
