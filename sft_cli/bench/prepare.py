"""Benchmark: `sft prepare` against TRL's SFTTrainer dataset preparation, same data, same tokenizer.

Generates N seeded synthetic conversations (OpenAI `messages` JSONL: mostly one turn, some two
or three, some with a system prompt; replies of lognormal length), then runs each side in a
fresh subprocess with cold caches, once with 1 worker process and once with 2:

    ours  python -m sft_cli prepare model.name_or_path=... data.sources=[{path: FILE}] max_seq_len=2048
          data.dedupe=true data.num_proc=N   (wall time; and wall minus the CLI's startup, a `--cfg job` call)
    trl   datasets.load_dataset("json") + SFTTrainer._prepare_dataset, SFTConfig(max_length=2048,
          packing=False, dataset_num_proc=N)   (wall time; and the tokenizer + load + prepare work alone)

TRL runs twice per worker count: with its default loss (the whole conversation, no mask to
compute) and with assistant_only_loss=True on a copy of the same chat template with
`{% generation %}` markers added (TRL needs them; the stock template renders the same text).
Throughput, token counts, peak memory and the speed ratio go into the "## prepare" section of
BENCHMARKS.md and a table on the terminal.

    python -m sft_cli.bench.prepare             # 100,000 rows, ~10 minutes on 2 cores (make bench-prepare)
    python -m sft_cli.bench.prepare --quick     # 10,000 rows
    python -m sft_cli.bench.prepare --repeat 2  # every configuration twice, the faster run kept
    python -m sft_cli.bench.prepare --data agentic --rows 5000   # tool calls + reasoning on Qwen3's template

`--data agentic` generates tool-calling conversations with reasoning (a `tools` list, calls with
arguments, tool results, `reasoning_content` on every reply, two user turns) and prepares them on
TRL's own Qwen3 template: ours with the stock `qwen3.jinja` (its history drops old reasoning, so
turns get their own examples), TRL with assistant_only_loss on its `qwen3_training.jinja` twin
(`{% generation %}` markers; old reasoning is simply not trained there). Section "## prepare (tool
calls and reasoning)".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from importlib import metadata
from pathlib import Path

import numpy as np

from sft_cli.bench import REPO, markdown, write_section

MAX_SEQ_LEN = 2048
SEED = 0
PREFERRED_MODEL, FALLBACK_MODEL = "builtin:smollm2-135m-instruct", "builtin:tiny-llama-chatml"
# Frequent words first: they are drawn with Zipf weights, so text has the repetition of real English.
WORDS = np.array("""
the of and to a in is it you that he was for on are with as I his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side
been now find any new work part take get place made live where after back little only round man year came
show every good me give our under name very through just form sentence great think say help low line differ
turn cause much mean before move right boy old too same tell does set three want air well also play small end
put home read hand port large spell add even land here must big high such follow act why ask men change went
light kind off need house picture try us again animal point mother world near build self earth father head
stand own page should country found answer school grow study still learn plant cover food sun four between
state keep eye never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin got walk example
ease paper group always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face wood
main enough plain girl usual young ready above ever red list though feel talk bird soon body dog family direct
leave song measure door product black short numeral class wind question happen complete ship area half rock
order fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel less
morning ten simple several vowel toward war lay against pattern slow center love person money serve appear
road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine
note wait plan figure star box noun field rest correct able pound done beauty drive stood contain front teach
week final gave green quick develop ocean warm free minute strong special mind behind clear tail produce fact
street inch multiply nothing course stay wheel full force blue object decide surface deep moon island foot
system busy test record boat common gold possible plane stead dry wonder laugh thousand ago ran check game
shape equate miss brought heat snow tire bring distant fill east paint language among grand ball yet wave
drop heart present heavy dance engine position arm wide sail material size vary settle speak weight general
ice matter circle pair include divide syllable felt perhaps pick sudden count square reason length represent
art subject region energy hunt probable bed brother egg ride cell believe fraction forest sit race window store
summer train sleep prove lone exercise wall catch mount wish sky board joy winter written wild instrument kept
glass grass cow job edge sign visit past soft fun bright gas weather month million bear finish happy hope
flower clothe strange gone jump baby eight village meet root buy raise solve metal whether push seven
paragraph third shall held hair describe cook floor either result burn hill safe cat century consider type
law bit coast copy phrase silent tall sand soil roll temperature finger industry value fight lie beat excite
natural view sense ear else quite broke case middle kill son lake moment scale loud spring observe child
straight consonant nation dictionary milk speed method organ pay age section dress cloud surprise quiet stone
tiny climb cool design poor lot experiment bottom key iron single stick flat twenty skin smile crease hole
trade melody trip office receive row mouth exact symbol die least trouble shout except wrote seed tone join
suggest clean break lady yard rise bad blow oil blood touch grew cent mix team wire cost lost brown wear garden
equal sent choose fell fit flow fair bank collect save control decimal gentle woman captain practice separate
difficult doctor please protect noon whose locate ring character insect caught period indicate radio spoke
atom human history effect electric expect crop modern element hit student corner party supply bone rail
imagine provide agree thus capital chair danger fruit rich thick soldier process operate guess necessary sharp
wing create neighbor wash bat rather crowd corn compare poem string bell depend meat rub tube famous dollar
stream fear sight thin triangle planet hurry chief colony clock mine tie enter major fresh search send yellow
gun allow print dead spot desert suit current lift rose continue block chart hat sell success company subtract
event particular deal swim term opposite wife shoe shoulder spread arrange camp invent cotton born determine
quart nine truck noise level chance gather shop stretch throw shine property column molecule select wrong gray
repeat require broad prepare salt nose plural anger claim continent oxygen sugar death pretty skill women
season solution magnet silver thank branch match suffix especially fig afraid huge sister steel discuss forward
similar guide experience score apple bought led pitch coat mass card band rope slip win dream evening condition
feed tool total basic smell valley nor double seat arrive master track parent shore division sheet substance
favor connect post spend chord fat glad original share station dad bread charge proper bar offer segment slave
duck instant market degree populate chick dear enemy reply drink occur support speech nature range steam motion
path liquid log meant quotient teeth shell neck 2 3 10 12 42 100 2024
""".split(), dtype=object)
ZIPF = 1.0 / np.arange(1, len(WORDS) + 1) ** 1.05
ZIPF /= ZIPF.sum()
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in plain English and keep it short.",
    "You are a patient teacher who explains every step of the reasoning.",
    "You are an expert travel guide. Be friendly and specific.",
]


# -- data -----------------------------------------------------------------------------------------
def _text(rng: np.random.Generator, n_words: int) -> str:
    words = WORDS[rng.choice(len(WORDS), n_words, p=ZIPF)].tolist()
    sentences, i = [], 0
    while i < n_words:
        k = int(rng.integers(6, 22))
        sentence = " ".join(words[i:i + k])
        sentences.append(sentence[0].upper() + sentence[1:] + (". " if rng.random() < 0.85 else "? "))
        i += k
    return "".join(sentences).strip()


def generate(path: Path, rows: int, seed: int = SEED) -> None:
    """`rows` conversations: 75% one turn, 18% two, 7% three; 20% with a system prompt; user prompts
    ~20 words, replies lognormal around 150 words, capped so every row fits max_seq_len."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            turns = int(rng.choice([1, 2, 3], p=[0.75, 0.18, 0.07]))
            messages = []
            if rng.random() < 0.2:
                system = SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))]
                messages.append({"role": "system", "content": system})
            for _ in range(turns):
                prompt_words = int(np.clip(rng.lognormal(np.log(20), 0.6), 4, 80))
                # ~1,100 words of replies per row stay under 2,048 tokens with a 49k BPE vocab.
                reply_words = int(np.clip(rng.lognormal(np.log(150), 0.7), 5, 1100 // turns))
                messages += [{"role": "user", "content": _text(rng, prompt_words)},
                             {"role": "assistant", "content": _text(rng, reply_words)}]
            handle.write(json.dumps({"messages": messages}) + "\n")


CITIES = ["Paris", "Lima", "Oslo", "Kyoto", "Cairo", "Quito", "Perth", "Dakar"]
AGENT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"}, "unit": {"type": "string"}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "description": "Search the web.",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                     "required": ["query"]}}}]


def generate_agentic(path: Path, rows: int, seed: int = SEED) -> None:
    """`rows` tool-calling conversations with reasoning: user asks, the assistant thinks and calls one or
    two tools, reads the results, thinks and answers; a second user turn gets a reasoned answer."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for i in range(rows):
            calls = []
            for k in range(int(rng.choice([1, 2], p=[0.7, 0.3]))):
                if rng.random() < 0.6:
                    calls.append({"id": f"c{i}_{k}", "type": "function", "function": {
                        "name": "get_weather", "arguments": {"city": CITIES[int(rng.integers(len(CITIES)))],
                                                             "unit": "celsius"}}})
                else:
                    calls.append({"id": f"c{i}_{k}", "type": "function", "function": {
                        "name": "search", "arguments": json.dumps({"query": _text(rng, 6)})}})  # JSON text
            messages = [{"role": "user", "content": _text(rng, int(rng.integers(8, 40)))},
                        {"role": "assistant", "content": None, "tool_calls": calls,
                         "reasoning_content": _text(rng, int(rng.integers(20, 120)))}]
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": _text(rng, int(rng.integers(10, 60)))}
                         for c in calls]
            messages += [{"role": "assistant", "content": _text(rng, int(rng.integers(20, 150))),
                          "reasoning_content": _text(rng, int(rng.integers(20, 150)))},
                         {"role": "user", "content": _text(rng, int(rng.integers(5, 30)))},
                         {"role": "assistant", "content": _text(rng, int(rng.integers(20, 150))),
                          "reasoning_content": _text(rng, int(rng.integers(20, 150)))}]
            handle.write(json.dumps({"tools": AGENT_TOOLS, "messages": messages}) + "\n")


def trl_template(name: str) -> Path:
    import trl

    return Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"


# -- tokenizer ------------------------------------------------------------------------------------
def pick_model() -> tuple[str, str, str]:
    """(builtin name, its folder, a note): SmolLM2's real 49k-token tokenizer, else the tiny one."""
    import importlib.util

    from sft_cli.assets import resolve_model

    try:
        if importlib.util.find_spec("sft_cli.assets.smollm2") is None:
            raise ImportError("sft_cli.assets.smollm2 is missing")
        return PREFERRED_MODEL, resolve_model(PREFERRED_MODEL), ""
    except Exception as exc:  # the package or module is absent: still benchmark, but say so loudly
        note = (f"SmolLM2 tokenizer unavailable ({type(exc).__name__}: {str(exc)[:120]}); fell back to "
                f"{FALLBACK_MODEL} (512-token BPE: ~3x more tokens per word than a real tokenizer).")
        return FALLBACK_MODEL, resolve_model(FALLBACK_MODEL), note


def marked_template(tokenizer, conversations: list[list[dict]]) -> str | None:
    """The tokenizer's ChatML template with `{% generation %}` around each reply + `<|im_end|>` (what
    both sides then train on), or None when the copy does not render these conversations identically."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "zq"}], tokenize=False)
    prefix = text[:text.find("<|im_start|>user")]  # a default system prompt the template inserts
    marked = (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}{{- " + json.dumps(prefix) + " -}}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- '<|im_start|>assistant\\n' -}}{% generation %}{{- message['content'] + '<|im_end|>' -}}"
        "{% endgeneration %}{{- '\\n' -}}"
        "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    for messages in conversations:
        for gen, msgs in ((False, messages), (True, messages[:-1])):
            render = [tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=t)
                      for t in (None, marked)]
            if render[0] != render[1]:
                return None
    return marked


# -- measurement ----------------------------------------------------------------------------------
def measure(cmd: list[str], tmp: Path, log: Path) -> dict:
    """Run `cmd` in `tmp` with a fresh datasets cache; wall seconds from spawn to exit, the largest
    process's peak RSS (wait4, exact) and the peak RSS summed over the process tree (workers
    included; psutil, sampled every 50 ms)."""
    import psutil

    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=tmp))  # nothing from an earlier run is reused
    # One tokenizer thread: num_proc is then the number of cores each side uses.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    peak_tree, done = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.wait(0.05):
            try:
                tree = [root, *root.children(recursive=True)]
                peak_tree[0] = max(peak_tree[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:  # a worker exited between listing and reading
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # wait4, not Popen.wait: it also returns the child's rusage
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         + log.read_text()[-3000:])
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "tree_rss_mb": peak_tree[0] / 2**20}


def _ours_cmd(model: str, data: Path, run_dir: Path, *extra: str) -> list[str]:
    # `extra` goes last: Hydra's argparse rejects overrides that follow `--cfg job`.
    return [sys.executable, "-m", "sft_cli", "prepare", f"model.name_or_path={model}",
            f"data.sources=[{{path: {data}}}]", f"run_dir={run_dir}", f"max_seq_len={MAX_SEQ_LEN}",
            "data.dedupe=true", *extra]


def ours_startup(model: str, data: Path, tmp: Path) -> float:
    """The CLI's fixed cost (interpreter, Hydra, config composition): best of three `--cfg job` calls."""
    return min(measure(_ours_cmd(model, data, tmp / "startup", "--cfg", "job"), tmp, tmp / "startup.log")["wall_s"]
               for _ in range(3))


def import_cost(tmp: Path) -> float:
    """What importing datasets + torch + transformers costs (the CLI's tokenizer load pulls in torch):
    inside our "work", outside TRL's. Best of two."""
    cmd = [sys.executable, "-c", "import datasets, torch, transformers"]
    return min(measure(cmd, tmp, tmp / "imports.log")["wall_s"] for _ in range(2))


def run_ours(model: str, data: Path, num_proc: int, tmp: Path, startup: float, *extra: str) -> dict:
    run_dir = tmp / f"ours-{num_proc}"  # fresh: prepare's output cache is cold
    result = measure(_ours_cmd(model, data, run_dir, f"data.num_proc={num_proc}", *extra), tmp,
                     tmp / f"ours-{num_proc}.log")
    report = json.loads((run_dir / "prepared" / "report.json").read_text())
    shutil.rmtree(run_dir)
    return {**result, "work_s": result["wall_s"] - startup, "examples": report.get("examples", report["kept"]),
            "tokens": report["train_tokens"] + report["eval_tokens"],
            "loss_tokens": report["train_loss_tokens"] + report["eval_loss_tokens"]}


def run_trl(tokenizer_dir: str, model_dir: str, data: Path, num_proc: int, template: Path | None,
            tmp: Path, assistant_only: bool | None = None) -> dict:
    """TRL on `template` (None: the tokenizer's own); assistant_only_loss defaults to "a template was given"."""
    assistant_only = bool(template) if assistant_only is None else assistant_only
    name = f"trl-{'assistant' if assistant_only else 'all'}-{num_proc}"
    cmd = [sys.executable, "-m", "sft_cli.bench.prepare", "--trl-worker", json.dumps({
        "data": str(data), "tokenizer": tokenizer_dir, "model": model_dir, "num_proc": num_proc,
        "template": str(template) if template else None, "assistant_only": assistant_only,
        "output_dir": str(tmp / name)})]
    log = tmp / f"{name}.log"
    result = measure(cmd, tmp, log)
    line = next(x for x in reversed(log.read_text().splitlines()) if x.startswith("{"))
    return {**result, **json.loads(line)}


def trl_worker(spec: dict) -> None:
    """In a subprocess: TRL's own preparation of `messages` data, as SFTTrainer does it in __init__.

    The trainer is built first on a one-row placeholder with preparation skipped, then
    `_prepare_dataset` (the method __init__ calls) runs on the real data: so model loading and
    trainer setup stay outside the timed work, and every setting is TRL's own."""
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if spec["template"]:
        tokenizer.chat_template = Path(spec["template"]).read_text()
    tokenizer_s = time.perf_counter() - start

    args = SFTConfig(output_dir=spec["output_dir"], max_length=MAX_SEQ_LEN, packing=False,
                     assistant_only_loss=spec["assistant_only"], dataset_num_proc=spec["num_proc"],
                     report_to="none", dataset_kwargs={"skip_prepare_dataset": True},
                     bf16=False)  # TRL defaults to bf16, which a CPU-only machine rejects; prep ignores it
    placeholder = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello"}]}])
    # The tiny model: only its config is touched, and its few KB keep model weights out of the peak RSS.
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(spec["model"]), args=args,
                         train_dataset=placeholder, processing_class=tokenizer)

    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=spec["data"], split="train")
    rows = len(dataset)
    dataset = trainer._prepare_dataset(dataset, tokenizer, args, args.packing, None, "train")
    work = tokenizer_s + time.perf_counter() - start
    tokens = pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py()
    labels = pc.list_flatten(dataset.data.column("labels"))
    loss_tokens = pc.sum(pc.not_equal(labels, -100).cast("int64")).as_py()
    print(json.dumps({"work_s": work, "rows": rows, "examples": len(dataset), "tokens": tokens,
                      "loss_tokens": loss_tokens}))


# -- report ---------------------------------------------------------------------------------------
def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "datasets", "tokenizers", "trl"))
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {versions}; "
            f"{datetime.date.today().isoformat()}")


def rows_of(results: list[dict], rows: int) -> list[list[str]]:
    table = []
    for r in results:
        table.append([r["side"], str(r["num_proc"]), r["loss"], f"{r['wall_s']:.1f}", f"{r['work_s']:.1f}",
                      f"{rows / r['work_s']:,.0f}", f"{r['tokens'] / r['work_s']:,.0f}",
                      f"{r['examples']:,}", f"{r['tokens']:,}",
                      f"{r['loss_tokens']:,}",
                      f"{r['rss_mb']:,.0f}", f"{r['tree_rss_mb']:,.0f}"])
    return table


HEADER = ["side", "num_proc", "loss on", "wall s", "work s", "examples/s", "tokens/s", "examples out",
          "tokens out", "loss tokens", "RSS MB", "tree RSS MB"]


RATIO_HEADER = ["num_proc", "vs", "ours/TRL (work)", "ours/TRL (wall)"]


def ratios(results: list[dict]) -> list[list[str]]:
    """ours/TRL examples per second, on work time and on wall time, per worker count and TRL variant."""
    out = []
    for ours in (r for r in results if r["side"] == "sft prepare"):
        for trl in (r for r in results if r["side"] == "trl" and r["num_proc"] == ours["num_proc"]):
            out.append([str(ours["num_proc"]), f"TRL, loss on {trl['loss']}",
                        f"{trl['work_s'] / ours['work_s']:.2f}x", f"{trl['wall_s'] / ours['wall_s']:.2f}x"])
    return out


def benchmark(rows: int, repeat: int, console, kind: str = "chat") -> dict:
    """Generate the data, run every configuration `repeat` times, keep each one's fastest run."""
    from transformers import AutoTokenizer

    from sft_cli.assets import resolve_model

    model, model_dir, note = pick_model()
    if note:
        console.print(f"[yellow]{note}[/]")
    tiny_dir = resolve_model(FALLBACK_MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="sft-bench-prepare-"))
    try:
        data = tmp / "chats.jsonl"
        console.print(f"generating {rows:,} {kind} conversations -> {data}")
        ours_extra: tuple[str, ...] = ()
        trl_all_template = None
        if kind == "agentic":
            generate_agentic(data, rows)
            ours_extra = (f"data.chat_template={trl_template('qwen3')}",)
            template, trl_all_template = trl_template("qwen3_training"), trl_template("qwen3")
        else:
            generate(data, rows)
            with open(data) as handle:
                sample = [json.loads(next(handle))["messages"] for _ in range(min(rows, 500))]
            marked = marked_template(AutoTokenizer.from_pretrained(model_dir), sample)
            template = None
            if marked is None:
                note += " TRL's assistant_only_loss run skipped: could not add {% generation %} markers to this template."
            else:
                template = tmp / "marked.jinja"
                template.write_text(marked)

        startup, imports = ours_startup(model, data, tmp), import_cost(tmp)
        console.print(f"sft CLI startup (`--cfg job`): {startup:.2f} s; importing datasets+torch+transformers: "
                      f"{imports:.2f} s")
        configs = []
        for num_proc in (1, 2):
            configs += [("sft prepare", "assistant", num_proc,
                         partial(run_ours, model, data, num_proc, tmp, startup, *ours_extra)),
                        ("trl", "all", num_proc,
                         partial(run_trl, model_dir, tiny_dir, data, num_proc, trl_all_template, tmp, False))]
            if template:
                configs.append(("trl", "assistant", num_proc,
                                partial(run_trl, model_dir, tiny_dir, data, num_proc, template, tmp)))
        best: dict[tuple, dict] = {}
        for attempt in range(repeat):  # whole rounds: a slow spell of the machine hits every side alike
            for side, loss, num_proc, run in configs:
                console.print(f"[{attempt + 1}/{repeat}] {side} (loss on {loss}) num_proc={num_proc} ...")
                result = {"side": side, "loss": loss, "num_proc": num_proc, **run()}
                console.print(f"  {result['wall_s']:.1f} s wall, {result['work_s']:.1f} s work")
                key = (side, loss, num_proc)
                if key not in best or result["work_s"] < best[key]["work_s"]:
                    best[key] = result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"model": model, "note": note.strip(), "startup": startup, "imports": imports,
            "results": list(best.values()), "kind": kind}


def agentic_section(bench: dict, rows: int, repeat: int, command: str) -> str:
    results = bench["results"]
    return "\n".join([
        "## prepare (tool calls and reasoning)", "",
        f"`sft prepare` against TRL's `SFTTrainer` preparation on {rows:,} synthetic agentic conversations "
        "(seeded: a `tools` list of two functions; the assistant reasons and calls one or two tools, arguments "
        "as objects or JSON text; tool results; a reasoned answer; a second user turn with a reasoned answer), "
        f"tokenizer `{bench['model']}`, TRL's own Qwen3 template, max_seq_len {MAX_SEQ_LEN}, no packing. "
        "Fresh subprocesses, cold caches, one tokenizer thread. " + (f"Best of {repeat} rounds." if repeat > 1
                                                                      else "One run each."), "",
        "- Ours: `data.chat_template=qwen3.jinja` (the stock template). Qwen3 drops the reasoning of turns before "
        "the last user message, so each such turn is trained in its own example, rendered as inference saw it: "
        "\"examples out\" is larger than the row count, and so are the tokens.",
        "- TRL, loss on assistant: `assistant_only_loss=True` on `qwen3_training.jinja`, its `{% generation %}` "
        "twin, which is prefix-preserving: it keeps every turn's reasoning in the history, where the stock "
        "template (and so inference) drops it. One example per row, so fewer tokens; its replies are trained "
        "after a history unlike the one the model sees at inference. TRL, loss on all: the stock template, no mask.",
        "- **work** and **wall** as in the section above.", "",
        markdown(HEADER, rows_of(results, rows)), "",
        "Speed ratio (ours / TRL, input rows per second):", "",
        markdown(RATIO_HEADER, ratios(results)), "",
        f"Command: `{command}`.", "", f"Machine: {machine()}.", ""])


def section(bench: dict, rows: int, repeat: int, command: str) -> str:
    results = bench["results"]
    masked = {r["loss_tokens"] for r in results if r["loss"] == "assistant"}
    same_mask = (f" Both sides' assistant masks train the same {masked.pop():,} tokens."
                 if len(masked) == 1 and any(r["side"] == "trl" and r["loss"] == "assistant" for r in results) else "")
    notes = [
        f"**wall**: process start to exit, imports included. **work**: ours = wall minus the CLI's startup "
        f"(a `--cfg job` call, {bench['startup']:.2f} s), so it still holds importing `datasets`/`torch`/"
        f"`transformers` ({bench['imports']:.2f} s on their own); TRL = tokenizer load + `load_dataset(\"json\")` + "
        "`_prepare_dataset` (imports, model load and trainer setup left out).",
        "examples/s (input rows) and tokens/s (the `input_ids` each side produced) are on work time. "
        "RSS MB: the largest single process (exact, from `wait4`); tree RSS MB: summed over the process and its "
        "workers (sampled every 50 ms; pages shared after `fork` count once per process).",
        "Ours also validates rows, dedupes, shuffles and writes `prepared/` (+ report, rejected rows) to disk. "
        "\"TRL, loss on all\" is its default for `messages` data: no mask at all. \"TRL, loss on assistant\" is "
        "`assistant_only_loss=True` with `{% generation %}` markers added to a copy of the same template (TRL "
        "requires them; the text renders identically)." + same_mask,
    ] + ([f"**Note:** {bench['note']}"] if bench["note"] else [])
    return "\n".join([
        "## prepare", "",
        f"`sft prepare` against TRL's `SFTTrainer` dataset preparation (`_prepare_dataset`, what its `__init__` "
        f"runs) on {rows:,} synthetic conversations (seeded: 75% one turn, 18% two, 7% three; 20% with a system "
        f"prompt; replies ~150 words, lognormal), tokenizer `{bench['model']}`, max_seq_len {MAX_SEQ_LEN}, no "
        "packing. Each run is a fresh subprocess with a cold cache and one tokenizer thread "
        "(`TOKENIZERS_PARALLELISM=false`), so num_proc is the number of cores used. "
        + (f"Best of {repeat} rounds." if repeat > 1 else "One run each."), "",
        *(f"- {n}" for n in notes), "",
        markdown(HEADER, rows_of(results, rows)), "",
        "Speed ratio (ours / TRL, examples per second; goal >= 2x):", "",
        markdown(RATIO_HEADER, ratios(results)), "",
        f"Command: `{command}` (`make bench-prepare` runs the 100,000-row default).", "",
        f"Machine: {machine()}.", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sft_cli.bench.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="10,000 rows")
    parser.add_argument("--repeat", type=int, default=1, help="run every configuration N times, keep the fastest")
    parser.add_argument("--data", choices=("chat", "agentic"), default="chat",
                        help="plain chats, or tool calls + reasoning on Qwen3's template")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)  # internal: one TRL run, JSON spec
    args = parser.parse_args(argv)
    if args.trl_worker:
        return trl_worker(json.loads(args.trl_worker))
    rows = 10_000 if args.quick else args.rows
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)  # logs get the whole table
    bench = benchmark(rows, args.repeat, console, args.data)
    for title, header, body in (("sft prepare vs TRL", HEADER, rows_of(bench["results"], rows)),
                                ("speed ratio", RATIO_HEADER, ratios(bench["results"]))):
        table = Table(title=f"{title} ({rows:,} conversations)")
        for column in header:
            table.add_column(column, justify="left" if column in ("side", "loss on", "vs") else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)

    command = ("python -m sft_cli.bench.prepare" + (" --data agentic" if args.data == "agentic" else "")
               + (" --quick" if args.quick else f" --rows {rows}" if rows != 100_000 else "")
               + (f" --repeat {args.repeat}" if args.repeat > 1 else ""))
    if args.data == "agentic":
        write_section(REPO / "BENCHMARKS.md", "prepare (tool calls and reasoning)",
                      agentic_section(bench, rows, args.repeat, command))
    else:
        write_section(REPO / "BENCHMARKS.md", "prepare", section(bench, rows, args.repeat, command))
    console.print(f"wrote the prepare section of {REPO / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
