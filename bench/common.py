"""What the benchmarks share: a measured subprocess, the machine line, BENCHMARKS.md, synthetic chats.

The benchmarks are not part of the installed package: they compare `sft` with TRL (install them
with `pip install -e '.[bench]'`) and run from the repository root, each writing its own "## name"
section of BENCHMARKS.md there:

    python -m bench.prepare    python -m bench.pack    python -m bench.train    (make bench)
    python -m bench.scale      python -m bench.loss

    >>> markdown(["side", "s"], [["ours", "1.0"]])
    '| side | s |\\n|---|---|\\n| ours | 1.0 |'
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# Every benchmark subprocess: offline, one tokenizer thread (num_proc is then the number of cores a
# side uses), output unbuffered so a log holds everything up to a crash.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1"}


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ + OFFLINE_ENV + `extra`, the repository root first on PYTHONPATH: a subprocess started
    in a temp folder still finds `bench` (its workers are `python -m bench.<name> --...-worker`) and
    this checkout's sft_cli."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **OFFLINE_ENV, "PYTHONPATH": path, **extra}


# -- a measured subprocess ------------------------------------------------------------------------
def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None, log: Path | None = None,
                 check: bool = True, sample_tree: bool = True) -> dict:
    """Run `cmd` to the end, stdout and stderr into `log`: {wall_s, rss_mb, tree_rss_mb, others_cores,
    returncode}. `check`: a failed command raises SystemExit with the end of its log. `sample_tree=False`:
    no sampling thread (tree_rss_mb 0), for a command that times itself and should have the CPU alone.

    rss_mb is the largest single process's exact high-water mark (wait4's ru_maxrss, which a short
    spike between two samples cannot escape); tree_rss_mb the summed RSS of the process and all its
    descendants (sampled every 50 ms from /proc, so datasets.map's worker processes count; pages
    shared after fork count once per process). Both count the memory-mapped file pages a process
    has touched. others_cores: the CPU other processes used meanwhile, in cores (contention).
    """
    busy, own = cpu_busy_s(), time.process_time()
    with open(log or os.devnull, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    peak_tree, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak_tree[0] = max(peak_tree[0], tree_rss_bytes(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_tree:
        sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # not Popen.wait: wait4 also returns the child's rusage
    wall = time.perf_counter() - start
    done.set()
    if sample_tree:
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen, so it never waits again
    if check and proc.returncode != 0:
        tail = log.read_text()[-4000:] if log else ""
        raise SystemExit(f"benchmark command failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    # Everything the machine did meanwhile, minus the child's tree (wait4 counts its reaped children) and us.
    others = cpu_busy_s() - busy - (usage.ru_utime + usage.ru_stime) - (time.process_time() - own)
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024,  # ru_maxrss is in KiB on Linux
            "tree_rss_mb": peak_tree[0] / 2**20, "others_cores": max(others, 0.0) / wall,
            "returncode": proc.returncode}


def tree_rss_bytes(root: int) -> int:
    """Summed resident memory of `root` and its descendants; processes that exit meanwhile count 0."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            # Fields after the parenthesised command name (which may hold spaces): state, ppid, ...
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    total, pending = 0, [root]
    while pending:
        pid = pending.pop()
        pending += children.get(pid, [])
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
        except OSError:
            pass
    return total


def cpu_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot, stolen time included (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def last_json(text: str) -> dict:
    """The last line of a worker's output that is a JSON object: its result."""
    return json.loads(next(x for x in reversed(text.splitlines()) if x.startswith("{")))


# -- report ---------------------------------------------------------------------------------------
def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def machine(packages: tuple[str, ...] = (), ram: bool = False, torch_threads: bool = False,
            load: bool = False) -> str:
    """Where the numbers come from: "N cores (CPU model)[, RAM][, torch threads], Python X, package
    versions; date[; load average]". N counts the cores this process may run on (nproc)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    parts = [f"{len(os.sched_getaffinity(0))} cores ({cpu})"]
    if ram:
        parts.append(f"{os.sysconf('SC_PHYS_PAGES') * PAGE_BYTES / 2**30:.0f} GiB RAM")
    if torch_threads:
        import torch

        parts.append(f"{torch.get_num_threads()} torch threads")
    parts += [f"Python {platform.python_version()}", *(f"{p} {version(p)}" for p in packages)]
    text = f"{', '.join(parts)}; {datetime.date.today().isoformat()}"
    if load:
        text += f"; load average at the end of the run {', '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min)"
    return text


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def print_table(console, title: str, header: list[str], rows: list[list[str]], left: tuple[str, ...] = ()) -> None:
    """A rich table on the terminal: the columns named in `left` left-aligned, numbers right-aligned."""
    from rich.table import Table

    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> Path:
    """Replace the "## NAME" section of BENCHMARKS.md (up to the next "## "), keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {name}"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = [""] + lines[end:] if end < len(lines) else []
        text = "\n".join(lines[:start] + body.rstrip("\n").splitlines() + tail) + "\n"
    path.write_text(text)
    return path


# -- synthetic chats (bench.prepare, bench.train, bench.scale) ------------------------------------
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
drop heart present heavy dance parallel_model position arm wide sail material size vary settle speak weight general
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


def prose(rng: np.random.Generator, n_words: int) -> str:
    """`n_words` Zipf-drawn words cut into sentences of 6 to 21 words, most ending in ".", some in "?"."""
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
                messages += [{"role": "user", "content": prose(rng, prompt_words)},
                             {"role": "assistant", "content": prose(rng, reply_words)}]
            handle.write(json.dumps({"messages": messages}) + "\n")


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

