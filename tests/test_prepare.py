"""`sft prepare` end to end through the real CLI on a tiny tokenizer."""

import json

import datasets
import pytest

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
MODEL = "model.name_or_path=builtin:tiny-llama-chatml"


def chat(i):
    return {"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": f"Answer {i}."}]}


def sources(*entries):
    return "data.sources=[" + ",".join("{" + ", ".join(f"{k}: {v}" for k, v in e.items()) + "}"
                                       for e in entries) + "]"


def report(run_dir):
    return json.loads((run_dir / "prepared" / "report.json").read_text())


def rejected(run_dir):
    return [json.loads(line) for line in (run_dir / "prepared" / "rejected.jsonl").read_text().splitlines()]


BAD_ROWS = [  # (row, reason) in file order; good rows between them
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no_assistant_turn"),
    ({"messages": CHAT + [{"role": "user", "content": "dangling"}]}, "not_ending_with_assistant"),
    ({"messages": [{"role": "wizard", "content": "x"}, CHAT[1]]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": ""}, CHAT[1]]}, "empty_content"),
    ({"messages": [{"role": "user", "content": None}, CHAT[1]]}, "empty_content"),
    ({"messages": [{"role": "user", "content": 42}, CHAT[1]]}, "non_string_content"),
    ({"messages": [{"role": "user"}, CHAT[1]]}, "missing_field"),
    ({"title": "no known columns"}, "unknown_format"),
    ('{"messages": [', "malformed_json"),
    (b'{"text": "caf\xe9 latin-1"}', "invalid_utf8"),
    (chat(0), "duplicate"),
]


def test_every_bad_input_class_is_counted_with_its_location(tmp_path, write_jsonl, sft):
    rows, expected = [chat(0)], {}
    for i, (row, reason) in enumerate(BAD_ROWS, start=1):
        rows += [row, chat(i)]
        expected[2 * i] = reason  # 1-based line number of the bad row
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    result = sft("prepare", MODEL, sources({"path": str(data)}), f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    got = {int(r["location"].rsplit(":", 1)[1]): r["reason"] for r in rejected(tmp_path / "run")}
    assert got == expected
    rep = report(tmp_path / "run")
    assert rep["kept"] == len(BAD_ROWS) + 1 and rep["rejected"] == len(BAD_ROWS)
    assert sum(rep["rejected_by_reason"].values()) == len(BAD_ROWS)
    assert rep["rejected_by_reason"]["empty_content"] == 2
    assert "duplicate" in result.stdout and "data.jsonl:2" in result.stdout  # table shows first locations
    prepared = datasets.load_from_disk(str(tmp_path / "run" / "prepared"))
    assert len(prepared["train"]) == rep["kept"]
    assert set(prepared["train"].column_names) >= {"input_ids", "labels", "source"}


def test_on_error_raise_stops_at_first_bad_row(tmp_path, write_jsonl, sft):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(0), chat(1), '{"broken', chat(2), {"x": 1}])
    result = sft("prepare", MODEL, sources({"path": str(data)}), "data.on_error=raise", f"run_dir={tmp_path}")
    assert result.returncode == 1
    assert f"{data}:3: malformed_json" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "prepared").exists()


def test_source_with_zero_valid_rows_is_an_error(tmp_path, write_jsonl, sft):
    good = write_jsonl(tmp_path / "good.jsonl", [chat(i) for i in range(3)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}, {"y": 2}])
    result = sft("prepare", MODEL, sources({"path": str(good)}, {"path": str(bad)}), f"run_dir={tmp_path}")
    assert result.returncode == 1 and "'bad' has zero valid rows" in result.stderr


def test_cache_hit_and_miss(tmp_path, write_jsonl, sft):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(20)])
    args = ["prepare", MODEL, sources({"path": str(data)}), f"run_dir={tmp_path / 'run'}"]
    assert sft(*args).returncode == 0
    first = json.loads((tmp_path / "run/prepared/manifest.json").read_text())
    again = sft(*args)
    assert again.returncode == 0 and "up to date" in again.stderr
    assert "sft prepare ->" not in again.stdout  # one line, not the tables again
    assert json.loads((tmp_path / "run/prepared/manifest.json").read_text()) == first
    write_jsonl(data, [chat(i) for i in range(21)])  # content changed: rebuild
    changed = sft(*args)
    assert "up to date" not in changed.stderr and report(tmp_path / "run")["kept"] == 21
    config_changed = sft(*args, "max_seq_len=128")
    assert "up to date" not in config_changed.stderr


def test_file_formats_glob_and_save_to_disk(tmp_path, write_jsonl, sft):
    import pandas as pd

    write_jsonl(tmp_path / "a" / "part1.jsonl", [chat(i) for i in range(3)])
    write_jsonl(tmp_path / "a" / "part2.jsonl", [chat(i) for i in range(3, 5)])
    (tmp_path / "b.json").write_text(json.dumps([chat(i) for i in range(5, 8)]))
    pd.DataFrame([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]).to_parquet(tmp_path / "c.parquet")
    pd.DataFrame([{"instruction": f"do {i}", "input": "", "output": f"done {i}"} for i in range(3)]) \
        .to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_list([{"text": f"plain text {i}"} for i in range(2)]).save_to_disk(str(tmp_path / "e"))
    srcs = sources({"path": f"'{tmp_path}/a/*.jsonl'"}, {"path": str(tmp_path / "b.json")},
                   {"path": str(tmp_path / "c.parquet")}, {"path": str(tmp_path / "d.csv")},
                   {"path": str(tmp_path / "e")})
    result = sft("prepare", MODEL, srcs, f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    kept = {name: s["kept"] for name, s in report(tmp_path / "run")["sources"].items()}
    assert kept == {"all": 5, "b": 3, "c": 4, "d": 3, "e": 2}


def test_weights_split_and_determinism(tmp_path, write_jsonl, sft):
    a = write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(100)])
    b = write_jsonl(tmp_path / "text.jsonl", [{"text": f"general text number {i}"} for i in range(100)])
    args = ["prepare", MODEL, sources({"path": str(a), "weight": 0.9}, {"path": str(b), "weight": 0.1}),
            "data.eval_fraction=0.1"]
    assert sft(*args, f"run_dir={tmp_path / 'r1'}").returncode == 0
    assert sft(*args, f"run_dir={tmp_path / 'r2'}").returncode == 0
    d1 = datasets.load_from_disk(str(tmp_path / "r1/prepared"))
    d2 = datasets.load_from_disk(str(tmp_path / "r2/prepared"))
    assert d1["train"]["input_ids"] == d2["train"]["input_ids"] and d1["eval"]["location"] == d2["eval"]["location"]
    shares = {s: d1["train"]["source"].count(s) / len(d1["train"]) for s in ("chat", "text")}
    assert shares == pytest.approx({"chat": 0.9, "text": 0.1}, abs=0.01)
    assert len(d1["eval"]) == 20  # 10% of each source, never repeated into train
    assert not set(d1["eval"]["location"]) & set(d1["train"]["location"])


def test_partial_weights_are_a_config_error(tmp_path, write_jsonl, sft):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(0)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(1)])
    result = sft("prepare", MODEL, sources({"path": str(a), "weight": 2}, {"path": str(b)}), f"run_dir={tmp_path}")
    assert result.returncode == 2 and "data.sources[1].weight" in result.stderr


def test_no_chat_template_is_a_config_error(tmp_path, write_jsonl, sft):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(0)])
    result = sft("prepare", "model.name_or_path=builtin:tiny-llama-none", sources({"path": str(data)}),
                 f"run_dir={tmp_path}")
    assert result.returncode == 2 and "data.chat_template" in result.stderr and "chatml" in result.stderr
    ok = sft("prepare", "model.name_or_path=builtin:tiny-llama-none", "data.chat_template=chatml",
             sources({"path": str(data)}), f"run_dir={tmp_path}")
    assert ok.returncode == 0, ok.stderr


def test_builtin_template_adds_its_markers(tmp_path, write_jsonl, sft):
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "d.jsonl", [chat(0)])
    result = sft("prepare", "model.name_or_path=builtin:tiny-llama-zephyr", "data.chat_template=chatml",
                 sources({"path": str(data)}), f"run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "prepared" / "tokenizer"))
    assert len(tok.encode("<|im_start|>", add_special_tokens=False)) == 1
    row = datasets.load_from_disk(str(tmp_path / "prepared"))["train"][0]
    assert tok.decode([t for t in row["labels"] if t != -100]) == "Answer 0.<|im_end|>"


def test_audit_fails_when_no_turn_ends_with_a_special_token(tmp_path, write_jsonl, sft):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    data = write_jsonl(tmp_path / "d.jsonl", [chat(0), chat(1)])
    result = sft("prepare", MODEL, f"data.chat_template={template}", sources({"path": str(data)}),
                 f"run_dir={tmp_path}")
    assert result.returncode == 1 and "end-of-turn" in result.stderr
    assert not (tmp_path / "prepared").exists()


def test_show_prints_tokens(tmp_path, write_jsonl, sft):
    data = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(3)])
    result = sft("prepare", MODEL, sources({"path": str(data)}), f"run_dir={tmp_path}", "show=2")
    assert result.returncode == 0
    assert result.stdout.count("trained (green") == 2 and "<|im_start|>" in result.stdout


def test_hub_source_offline_is_one_clear_line(tmp_path, sft):
    result = sft("prepare", MODEL, sources({"path": "someone/some-dataset"}), f"run_dir={tmp_path}", timeout=120)
    assert result.returncode == 1
    assert "local" in result.stderr and "Traceback" not in result.stderr


def test_missing_file_is_a_config_error(tmp_path, sft):
    result = sft("prepare", MODEL, sources({"path": str(tmp_path / "nope.jsonl")}), f"run_dir={tmp_path}")
    assert result.returncode == 2 and "data.sources[0].path" in result.stderr


def test_loss_on_all_chat_data_passes_the_audit(tmp_path, sft):
    """Under loss_on=all the last trained token of a ChatML chat is the newline after <|im_end|>;
    the end-of-turn audit must not mistake that for a template that never trains its stop token."""
    from tests.conftest import write_chat_jsonl

    data = write_chat_jsonl(tmp_path / "chat.jsonl", rows=20)
    result = sft("prepare", "model.name_or_path=builtin:tiny-llama-chatml", f"data.sources=[{{path: {data}}}]",
                 "data.loss_on=all", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]


# -- the prepared output, pinned ---------------------------------------------------------------------
WORDS = ["alpha", "beta", "gamma", "Ünïcödé", "中文", "🙂", "time", "model", "loss", "token", "42", "x\ny", "  ", "-"]


def _words(rng, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high)))).strip() or "empty"


def plain_rows(rows: int = 300, seed: int = 7) -> list:
    """Every input shape prepare reads (chats of 1-3 turns with and without a system prompt, ShareGPT,
    alpaca, prompt/completion as strings and as messages, text), with duplicates, bad rows and
    overlong rows among them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: list = []
    for i in range(rows):
        kind = i % 10
        if kind < 5:
            messages = [{"role": "system", "content": _words(rng, 2, 6)}] if rng.random() < 0.3 else []
            for _ in range(int(rng.integers(1, 4))):
                messages += [{"role": "user", "content": _words(rng, 1, 12)},
                             {"role": "assistant", "content": _words(rng, 1, 40 if rng.random() < 0.9 else 400)}]
            out.append({"messages": messages})
        elif kind == 5:
            out.append({"conversations": [{"from": "human", "value": _words(rng, 1, 9)},
                                          {"from": "gpt", "value": _words(rng, 1, 30)}]})
        elif kind == 6:
            out.append({"instruction": _words(rng, 1, 9), "input": _words(rng, 0, 3), "output": _words(rng, 1, 30)})
        elif kind == 7:
            out.append({"prompt": _words(rng, 1, 9), "completion": _words(rng, 1, 30)})
        elif kind == 8:
            out.append({"prompt": [{"role": "user", "content": _words(rng, 1, 9)}],
                        "completion": [{"role": "assistant", "content": _words(rng, 1, 30)}]})
        else:
            out.append({"text": _words(rng, 1, 60)})
        if i % 23 == 22:
            out.append(out[int(rng.integers(len(out)))])  # an exact duplicate
        if i % 41 == 40:
            out.append(BAD_ROWS[int(rng.integers(len(BAD_ROWS) - 1))][0])
    return out


def agentic_rows(rows: int = 40, seed: int = 11) -> list[dict]:
    """Tool calls (one or two, arguments as objects or JSON text), tool results, reasoning as a field
    and inline, turns without reasoning, and plain chats among them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tools = [{"type": "function", "function": {"name": name, "description": _words(rng, 2, 6),
                                               "parameters": {"type": "object", "properties": {
                                                   "q": {"type": "string"}}}}} for name in ("lookup", "weather")]
    out = []
    for i in range(rows):
        calls = [{"type": "function", "function": {"name": str(rng.choice(["lookup", "weather"])), "arguments": (
            json.dumps({"q": _words(rng, 1, 4)}) if rng.random() < 0.5 else {"q": _words(rng, 1, 4)})}}
            for _ in range(int(rng.integers(1, 3)))]
        messages = [{"role": "user", "content": _words(rng, 1, 10)},
                    {"role": "assistant", "content": None, "tool_calls": calls,
                     **({"reasoning_content": _words(rng, 1, 20)} if rng.random() < 0.8 else {})}]
        messages += [{"role": "tool", "content": _words(rng, 1, 15)} for _ in calls]
        answer = _words(rng, 1, 30)
        messages.append({"role": "assistant", "content": f"<think>{_words(rng, 1, 10)}</think>{answer}"
                         if rng.random() < 0.3 else answer})
        if rng.random() < 0.6:
            messages += [{"role": "user", "content": _words(rng, 1, 10)},
                         {"role": "assistant", "content": _words(rng, 1, 20), "reasoning_content": _words(rng, 1, 15)}]
        out.append({"tools": tools, "messages": messages} if i % 7 else {"messages": messages[:1] + messages[-1:]})
    return out


def prepared_digest(run_dir) -> str:
    """sha256 of everything prepare wrote that a later stage reads: every column of every split,
    the features, the report (bar the run folder) and the rejected rows. Locations name the data file
    by its path: the test's temporary folder is left out."""
    import hashlib

    prepared = run_dir / "prepared"
    dataset = datasets.load_from_disk(str(prepared))
    report = {k: v for k, v in json.loads((prepared / "report.json").read_text()).items() if k != "run_dir"}
    content = {"splits": {name: {"features": split.features.to_dict(), "columns": split.to_dict()}
                          for name, split in dataset.items()},
               "report": report, "rejected": (prepared / "rejected.jsonl").read_text()}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False).replace(str(run_dir.parent), "TMP")
    return hashlib.sha256(text.encode()).hexdigest()


def qwen3_template():
    """TRL's copy of Qwen3's template: its history drops old reasoning, so turns get their own examples."""
    from pathlib import Path

    trl = pytest.importorskip("trl")
    return Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja"


CASES = {  # name: (rows, overrides); a few plain rows are overlong at 1024 tokens, no agentic one
    "plain": (plain_rows, ["max_seq_len=1024"]),
    "plain_truncated": (plain_rows, ["max_seq_len=1024", "data.overlong=truncate", "data.loss_on=last_assistant"]),
    "agentic": (agentic_rows, ["max_seq_len=4096", "data.chat_template=QWEN3"]),
}
PINNED = {"plain": "c590ab38056ef0e84ea9ec49b00089eebc4cc23ff19a8cf4b5a9ff300deaf5f1",
          "plain_truncated": "b7c7e348dce5961c2621bf0035b4f2e0a8a685f8346eb48d57440b39a61dbbe4",
          "agentic": "c5764759089bca530f78acfc879bef46c7de60512fb301c3ce644a958117fd33"}


def prepare_case(sft, write_jsonl, tmp_path, case: str, num_proc: int):
    rows, overrides = CASES[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", rows())
    overrides = [o.replace("QWEN3", str(qwen3_template())) for o in overrides]
    return sft("prepare", MODEL, sources({"path": str(path)}), "data.eval_fraction=0.1", f"data.num_proc={num_proc}",
               f"run_dir={tmp_path / 'run'}", *overrides)


@pytest.mark.parametrize("num_proc", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_prepared_output_is_pinned(tmp_path, write_jsonl, sft, case, num_proc):
    """Speed work must not change a single token, label or count: the same input and seed give
    these exact bytes, with one worker or two."""
    result = prepare_case(sft, write_jsonl, tmp_path, case, num_proc)
    assert result.returncode == 0, result.stderr[-2000:]
    assert prepared_digest(tmp_path / "run") == PINNED[case]
