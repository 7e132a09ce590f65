"""`pip install .` ships everything `sft` reads at run time, and nothing from bench/ or tools/.

conf/ and recipes/ sit at the top of the repository but install as sft_cli.conf and
sft_cli.recipes (pyproject.toml), and cli.py finds them through importlib.resources, never
through the source tree. The wheel test builds from a copy of the sources (~2 s, no network).
"""

import importlib.resources
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sft_cli import cli

ROOT = Path(__file__).resolve().parent.parent
# What a checkout holds beside the package; bench/ and tools/ go along to prove they stay out.
SOURCES = ["pyproject.toml", "README.md", "sft_cli", "conf", "recipes", "bench", "tools"]
# Folder in the checkout -> where its files land in the wheel.
SHIPPED = {"sft_cli": "sft_cli", "conf": "sft_cli/conf", "recipes": "sft_cli/recipes"}


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def test_config_and_recipes_resolve_through_the_package():
    conf = importlib.resources.files("sft_cli.conf")
    recipes = importlib.resources.files("sft_cli.recipes")
    assert conf.joinpath("config.yaml").is_file()
    assert {"lora.yaml", "none.yaml"} <= {p.name for p in conf.joinpath("peft").iterdir()}
    assert recipes.joinpath("demo.yaml").is_file()
    assert (cli.CONF_DIR, cli.RECIPES_DIR) == (Path(str(conf)), Path(str(recipes)))
    assert {"model", "peft", "sweep", "recipe"} <= cli._config_groups()
    assert not any(name.startswith("_") for name in cli._config_groups())  # no __pycache__


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with this environment's setuptools instead of downloading one.
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("sft_cli-*.whl")
    return path


def test_wheel_holds_the_package_its_configs_and_recipes_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{dest}/{p.relative_to(ROOT / folder).as_posix()}"
                for folder, dest in SHIPPED.items() for p in _files(ROOT / folder)}
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (a new folder to list in pyproject.toml?): {missing}"
    assert {"sft_cli/conf/peft/lora.yaml", "sft_cli/recipes/demo.yaml", "sft_cli/assets/data/mmlu_cot.jsonl",
            "sft_cli/templates/chatml.jinja"} <= names
    assert {name.split("/")[0] for name in names} == {"sft_cli", "sft_cli-0.1.0.dist-info"}
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "sft = sft_cli.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_unpacked_wheel_composes_the_demo_recipe_outside_the_checkout(wheel, tmp_path):
    """The wheel's files alone, first on the path, run from a folder that is not the checkout."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import sft_cli.cli as c; print(c.CONF_DIR); print(c.RECIPES_DIR)"
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert where.stdout.split() == [str(site / "sft_cli" / "conf"), str(site / "sft_cli" / "recipes")], where.stderr
    result = subprocess.run([sys.executable, "-m", "sft_cli", "prepare", "recipe=demo", "--cfg", "job"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "name_or_path: builtin:smollm2-135m-instruct" in result.stdout
    assert "${asset:data/mmlu_cot.jsonl}" in result.stdout
