"""`sft generate` through the CLI on the shared tiny LoRA run: every sample recorded, the kept ones
prepare cleanly, unusable rows are reported with their line, a killed run resumes to the same
samples, greedy generation reproduces `sft evaluate`, scorers and config errors."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from sft_cli.generate import resume
from tests.conftest import TINY_MODEL, _write_jsonl

PROMPT_ROWS = [
    {"messages": [{"role": "user", "content": "Say something 1"}]},
    {"messages": [{"role": "user", "content": "Say something 2"}, {"role": "assistant", "content": "alpha beta"}]},
    {"prompt": "Say something 3", "completion": "gamma"},
    "this line is not JSON",
    {"text": "a plain text row has no prompt"},
    {"instruction": "Say something 4", "output": "delta"},
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path) -> Path:
    return _write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)


def test_generate_records_every_sample_and_its_data_prepares_cleanly(lora_run_copy, prompts, sft, tmp_path):
    run = lora_run_copy
    args = ["generate", f"run_dir={run}", f"gen.prompts={prompts}", "gen.n=3", "gen.max_new_tokens=6",
            "gen.temperature=1.0", "gen.keep_truncated=true", "gen.dedupe=null", "gen.select=all_passing"]
    result = sft(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    out = run / "generated"
    lines = read_jsonl(out / "all.jsonl")
    # 4 usable prompts x 3 samples, in file order, each sample once.
    assert [(Path(line["location"]).name, line["sample"]) for line in lines] == [
        (f"prompts.jsonl:{row}", s) for row in (1, 2, 3, 6) for s in range(3)]
    assert lines[0]["id"] == "prompts#0" and lines[-1]["id"] == "prompts#5"  # source#row: the sample streams' key
    assert lines[3]["messages"] == [{"role": "user", "content": "Say something 2"}]  # the reference is cut off
    assert lines[3]["reference"] == "alpha beta" and lines[6]["reference"] == "gamma"
    assert all(line["new_tokens"] <= 6 and line["verdict"] == "unscored" for line in lines)
    for line in lines:  # scorer none + all_passing + keep_truncated: everything with content is kept
        assert line["kept"] == bool(line["content"].strip()), line
        assert line["why"] == ("kept" if line["kept"] else "empty")
    # The unusable rows: each reported with its line and reason, none silently dropped.
    rejected = read_jsonl(out / "rejected.jsonl")
    assert [(r["location"].rsplit(":", 1)[1], r["reason"]) for r in rejected] == [("4", "malformed_json"),
                                                                                ("5", "no_prompt")]
    data = read_jsonl(out / "data.jsonl")
    kept = [line for line in lines if line["kept"]]
    assert len(data) == len(kept) > 0
    assert data[0]["messages"] == kept[0]["messages"] + [{"role": "assistant", "content": kept[0]["content"]}]
    report = json.loads((out / "report.json").read_text())
    assert (report["prompts"], report["samples"], report["kept"], report["rejected_rows"]) == (4, 12, len(kept), 2)
    assert report["new_tokens"] == sum(line["new_tokens"] for line in lines) and report["tokens_per_s"] > 0
    assert report["overall"]["pass@1"] is None  # nothing was scored
    assert (out / "generation.png").read_bytes()[:4] == b"\x89PNG"
    assert "sft generate" in result.stdout and "data.jsonl" in result.stdout

    # The kept replies are training data as they stand: prepare rejects none of them.
    prepared = sft("prepare", f"model.name_or_path={TINY_MODEL}", f"data.sources=[{{path: {out / 'data.jsonl'}}}]",
                   f"run_dir={tmp_path / 'prep'}", "max_seq_len=256")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    report = json.loads((tmp_path / "prep" / "prepared" / "report.json").read_text())
    assert report["rejected"] == 0 and report["kept"] == len(data)

    again = sft(*args)  # the same job again: nothing to do
    assert again.returncode == 0 and "up to date" in again.stderr


def test_a_killed_run_resumes_to_the_same_samples(lora_run, prompts, sft, tmp_path, monkeypatch):
    def args(run_dir):
        return ["generate", f"gen.model={lora_run}", f"run_dir={run_dir}", f"gen.prompts={prompts}", "gen.n=2",
                "gen.max_new_tokens=8", "gen.temperature=1.0", "gen.batch_size=3", "gen.keep_truncated=true"]

    whole = sft(*args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    monkeypatch.setenv("SFT_FAULT_KILL_AT", "generate:2")
    killed = sft(*args(tmp_path / "killed"))
    assert killed.returncode == -signal.SIGKILL
    partial = read_jsonl(tmp_path / "killed" / "generated" / "all.jsonl")
    assert len(partial) == 4  # two prompts x two samples, written whole
    assert not (tmp_path / "killed" / "generated" / "data.jsonl").exists()
    monkeypatch.delenv("SFT_FAULT_KILL_AT")
    resumed = sft(*args(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 prompts already done" in resumed.stderr
    for name in ("all.jsonl", "data.jsonl"):
        assert (tmp_path / "killed" / "generated" / name).read_bytes() == (tmp_path / "whole" / "generated" / name
                                                                           ).read_bytes()


def test_resume_cuts_a_torn_tail(tmp_path):
    out = tmp_path / "generated"
    out.mkdir()
    whole = [{"id": "a", "sample": s} for s in range(2)]
    text = "".join(json.dumps(line) + "\n" for line in whole) + json.dumps({"id": "b", "sample": 0}) + "\n" + '{"id": "b", "sa'
    (out / "all.jsonl").write_text(text)
    assert resume(out, "fp", overwrite=False, n=2) == {"a"}
    assert read_jsonl(out / "all.jsonl") == whole  # prompt b is sampled again, whole
    with pytest.raises(Exception, match="gen.overwrite"):
        resume(out, "another-job", overwrite=False, n=2)
    assert resume(out, "another-job", overwrite=True, n=2) == set() and not (out / "all.jsonl").exists()


def test_greedy_generation_reproduces_evaluate(lora_run_copy, sft, tmp_path):
    run = lora_run_copy
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": f"Say something {i}"}]}
                                                   for i in (5, 17, 60)])
    evaluated = sft("evaluate", f"run_dir={run}", f"eval.prompts={prompts}", "eval.num_prompts=3",
                    "eval.max_new_tokens=10", "eval.compare_base=false")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    greedy = [r for r in read_jsonl(run / "eval" / "generations.jsonl") if r["mode"] == "greedy"]
    generated = sft("generate", f"run_dir={run}", f"gen.prompts={prompts}", "gen.n=1", "gen.temperature=0",
                    "gen.max_new_tokens=10", "gen.keep_truncated=true", "gen.batch_size=2")
    assert generated.returncode == 0, generated.stderr[-3000:]
    lines = read_jsonl(run / "generated" / "all.jsonl")
    assert [line["content"] for line in lines] == [r["reply"] for r in greedy]
    assert [line["new_tokens"] for line in lines] == [r["new_tokens"] for r in greedy]
    assert [line["stopped"] for line in lines] == [r["stopped"] for r in greedy]


def test_match_scorer_keeps_only_right_answers(lora_run_copy, sft, tmp_path):
    """References made from the model's own greedy replies: those it reproduces pass, a wrong one fails."""
    run = lora_run_copy
    questions = [f"Say something {i}" for i in (3, 9, 33)]
    probe = _write_jsonl(tmp_path / "probe.jsonl", [{"messages": [{"role": "user", "content": q}]} for q in questions])
    common = [f"run_dir={run}", "gen.n=1", "gen.temperature=0", "gen.max_new_tokens=6", "gen.keep_truncated=true"]
    assert sft("generate", f"gen.prompts={probe}", *common).returncode == 0
    replies = [line["content"] for line in read_jsonl(run / "generated" / "all.jsonl")]
    assert all(replies), replies
    rows = [{"messages": [{"role": "user", "content": q}], "answer": a}
            for q, a in zip(questions, [replies[0], replies[1], "certainly not this"])]
    graded = _write_jsonl(tmp_path / "graded.jsonl", rows)
    result = sft("generate", f"gen.prompts={graded}", "gen.scorer=match", "gen.extract=exact", "gen.overwrite=true",
                 *common)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_jsonl(run / "generated" / "all.jsonl")
    assert [(line["passed"], line["verdict"], line["kept"]) for line in lines] == [
        (True, "ok", True), (True, "ok", True), (False, "wrong_answer", False)]
    report = json.loads((run / "generated" / "report.json").read_text())
    assert report["overall"]["pass@1"] == pytest.approx(2 / 3) and report["kept"] == 2
    assert len(read_jsonl(run / "generated" / "data.jsonl")) == 2


def test_unusable_references_are_rejected_with_reasons(lora_run_copy, sft, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "The answer is (B)."}]},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "no letter here"}]},
            {"messages": [{"role": "user", "content": "q3"}]}]
    path = _write_jsonl(tmp_path / "mc.jsonl", rows)
    result = sft("generate", f"run_dir={lora_run_copy}", f"gen.prompts={path}", "gen.scorer=match", "gen.n=1",
                 "gen.temperature=0", "gen.max_new_tokens=4")
    assert result.returncode == 0, result.stderr[-3000:]
    rejected = read_jsonl(lora_run_copy / "generated" / "rejected.jsonl")
    assert [(r["location"].rsplit(":", 1)[1], r["reason"]) for r in rejected] == [("2", "reference_unparsable"),
                                                                                ("3", "no_reference")]
    assert "2 prompt rows not usable" in result.stderr


@pytest.mark.parametrize("overrides, key", [
    (["gen.temperature=0", "gen.n=4"], "gen.n"),
    (["gen.scorer=reward"], "gen.reward_model"),
    (["gen.scorer=match", "gen.extract=regex"], "gen.pattern"),
    (["gen.pattern=(unclosed"], "gen.pattern"),
    (["gen.select=worst"], "gen.select"),
    (["gen.engine=vllm"], "gen.engine"),
])
def test_config_errors_name_the_key(lora_run_copy, prompts, sft, overrides, key):
    result = sft("generate", f"run_dir={lora_run_copy}", f"gen.prompts={prompts}", *overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert key in result.stderr and "Traceback" not in result.stderr


def test_another_job_in_the_same_run_dir_is_refused(lora_run_copy, prompts, sft):
    common = [f"run_dir={lora_run_copy}", f"gen.prompts={prompts}", "gen.max_new_tokens=2", "gen.n=1"]
    assert sft("generate", *common).returncode == 0
    other = sft("generate", *common, "gen.temperature=0.5")
    assert other.returncode == 2 and "gen.overwrite" in other.stderr
    assert sft("generate", *common, "gen.temperature=0.5", "gen.overwrite=true").returncode == 0


def test_no_prompts_is_a_config_error(lora_run_copy, sft):
    result = sft("generate", f"run_dir={lora_run_copy}")
    assert result.returncode == 2 and "gen.prompts" in result.stderr


THINKING_TEMPLATE = """{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n<think>\\n' -}}
{%- endif -%}"""


def test_a_template_that_opens_reasoning_gets_replies_split(prompts, sft, tmp_path):
    """A generation prompt ending in `<think>\\n` (Qwen3.5 thinking, R1 distills): the reply starts inside
    the reasoning block, so what the model wrote is reasoning_content; never closing it leaves no content,
    and such a reply is not kept as training data."""
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    result = sft("generate", f"gen.model={TINY_MODEL}", f"data.chat_template={template}", f"run_dir={tmp_path / 'r'}",
                 f"gen.prompts={prompts}", "gen.n=2", "gen.max_new_tokens=6", "gen.temperature=1.0",
                 "gen.keep_truncated=true")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_jsonl(tmp_path / "r" / "generated" / "all.jsonl")
    assert all(line["reasoning_content"] is not None for line in lines)  # every reply began inside the block
    unclosed = [line for line in lines if line["content"] == ""]
    assert unclosed, "a 6-token random reply should rarely close </think>"
    assert all(line["why"] == "empty" and not line["kept"] for line in unclosed)


def test_prompt_only_rows_and_line_separators_inside_text(lora_run_copy, sft, tmp_path):
    """Rows with only a prompt (or a question and its answer) are prompts; text holding U+2028 / U+0085
    (written raw into all.jsonl) does not split a JSONL row."""
    rows = [{"prompt": "Say something 1"}, {"question": "Say something\u2028 2", "answer": "alpha"},
            {"problem": "Say\x85 something 3"}]
    path = _write_jsonl(tmp_path / "questions.jsonl", rows)
    result = sft("generate", f"run_dir={lora_run_copy}", f"gen.prompts={path}", "gen.n=2", "gen.max_new_tokens=4",
                 "gen.keep_truncated=true")
    assert result.returncode == 0, result.stderr[-3000:]
    out = lora_run_copy / "generated"
    assert not (out / "rejected.jsonl").read_text()
    lines = [json.loads(raw) for raw in (out / "all.jsonl").read_bytes().split(b"\n") if raw]
    assert [line["messages"][0]["content"] for line in lines[::2]] == [r.get("prompt") or r.get("question")
                                                                       or r.get("problem") for r in rows]
    assert lines[2]["reference"] == "alpha" and lines[0]["reference"] is None
    assert json.loads((out / "report.json").read_text())["samples"] == 6


def test_a_training_checkpoint_samples_like_the_final_model(lora_run, sft, tmp_path):
    """gen.model=run/checkpoints/step-N (trainable weights only) is rebuilt as training built it: the
    last checkpoint holds the final weights, so its greedy replies are final/'s."""
    steps = sorted((lora_run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    last = steps[-1]
    assert last.name == "step-6"  # conftest.lora_run trains 6 steps, saving every 2
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something {i}"} for i in range(3)])
    common = [f"gen.prompts={prompts}", "gen.n=1", "gen.temperature=0", "gen.max_new_tokens=8",
              "gen.keep_truncated=true"]
    replies = {}
    for name, model in (("final", lora_run), ("checkpoint", last)):
        result = sft("generate", f"gen.model={model}", f"run_dir={tmp_path / name}", *common)
        assert result.returncode == 0, result.stderr[-3000:]
        replies[name] = [line["content"] for line in read_jsonl(tmp_path / name / "generated" / "all.jsonl")]
    assert replies["checkpoint"] == replies["final"]
