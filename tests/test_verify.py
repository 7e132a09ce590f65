"""verify.py: answer extraction and matching by hand, the shipped MMLU data scored against itself,
code pulled out of chat replies, the sandbox's verdicts (and the escapes it refuses), and a tiny
random reward model's scores (finite, deterministic, independent of the batch)."""

import json
import math
import os
import socket
import time
from pathlib import Path

import pytest

from sft_cli import verify
from sft_cli.verify import (
    EXTRACTORS,
    RewardModel,
    Verdict,
    answers_match,
    code_from_reply,
    extract_answer,
    reference_answer,
    run_sandboxed,
    run_sandboxed_many,
    score_match,
    score_tests,
)

MMLU = Path(__file__).resolve().parent.parent / "sft_cli" / "assets" / "data" / "mmlu_cot.jsonl"

# ---------------------------------------------------------------- answers


@pytest.mark.parametrize("text, expected", [
    ("Let's think step by step. ... The answer is (C).", "C"),
    ("Answer: b", "B"),
    ("Answer: (d)", "D"),
    ("the correct answer is: **A**", "A"),
    ("At first the answer is (B), but checking again (A) fails too, so the answer is D.", "D"),
    ("Options (A) and (C) look close; (C) fits.", None),  # no phrase and two letters named: no answer
    ("(A) 2, (B) 3, (C) 4 and (D) 5. I am not sure.", None),  # restating the options is not answering
    ("I would pick (C) here.", "C"),  # no phrase, one letter named
    ("(B)", "B"),
    ("C) True, False", "C"),  # answer first: the option it opens with
    ("D) False, False (B)", None),  # two options named, no answer phrase: ambiguous
    ("A cat (B) sat", "B"),  # a capital A starting prose is not an option
    ("c", "C"),
    ("the answer is a number we cannot know", None),  # a bare lower-case 'a' in prose is not A
    ("I am not sure.", None),
    ("The answer is (K).", None),  # A-J only
])
def test_letter(text, expected):
    assert extract_answer(text, "letter") == expected


@pytest.mark.parametrize("text, expected", [
    ("In total 1,234 apples.", "1234"),
    ("It costs $3.50.", "3.5"),
    ("so x = -3", "-3"),
    ("x-3 is it", "3"),  # a hyphen after a word is not a minus sign
    ("about 1e-3 of it", "0.001"),
    ("2.5e3 m", "2500"),
    ("a half: 3/4", "0.75"),
    ("a third: 1/3", "1/3"),
    ("She has 5 then 12 more. #### 72", "72"),  # GSM8K marker beats the last number
    ("#### 1,000\nchecked with 3 examples", "1000"),
    (r"we get \boxed{42}, and 7 was a guess", "42"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{-\dfrac{3}{4}}", "-0.75"),
    (r"the area is \boxed{12\text{ cm}^2}", "12"),  # the first number in the box, not the exponent
    ("no numbers here", None),
    ("version v1.2", None),
])
def test_number(text, expected):
    assert extract_answer(text, "number") == expected


@pytest.mark.parametrize("a, b, same", [
    ("3.50", "3.5", True), ("1,234", "1234", True), ("0.5", "1/2", True), ("1/3", "0.3333333", True),
    ("-3", "3", False), ("72", "73", False), ("1e-3", "0.001", True),
])
def test_numbers_match_numerically(a, b, same):
    assert answers_match(a, b, "number") is same
    assert answers_match(extract_answer(a, "number"), extract_answer(b, "number"), "number") is same


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{a}{b+1}}} is it", r"\sqrt{\frac{a}{b+1}}"),  # nested braces stay balanced
    (r"$\boxed{\dfrac{3}{4}}$", r"\frac{3}{4}"),
    (r"\boxed{ \left( 1, 2 \right) }", "(1,2)"),
    (r"\boxed{x\!=\!5.}", "x=5"),
    (r"first \boxed{1}, then \fbox{7}", "7"),  # the last box
    (r"\boxed{\leftarrow}", r"\leftarrow"),  # only \left itself is dropped
    (r"\boxed{1 + {2", None),  # never closed
    ("no box", None),
])
def test_boxed(text, expected):
    assert extract_answer(text, "boxed") == expected


def test_boxed_match():
    assert answers_match(r"\frac{1}{2}", "0.5", "boxed")
    assert answers_match(r"\frac{1}{2}", r"\frac12", "boxed")
    assert not answers_match(r"\frac{1}{2}", r"\frac{1}{3}", "boxed")
    assert answers_match(r"(1,2)", r"\left(1, 2\right)", "boxed")
    assert not answers_match(r"(1,2)", "(2,1)", "boxed")


def test_regex_and_exact():
    assert extract_answer("Final: foo\nFinal:  bar \n", "regex", r"Final:(.*)") == "bar"  # last match, group 1
    assert extract_answer("ids 12 and 345", "regex", r"\d+") == "345"  # no group: the whole match
    assert extract_answer("nothing", "regex", r"Final: (\w+)") is None
    assert extract_answer("x", "regex", r"(a)?x") is None  # group 1 took no part
    with pytest.raises(ValueError, match="pattern"):
        extract_answer("x", "regex")
    assert extract_answer("  hello \n   world  ", "exact") == "hello world"
    assert extract_answer(" \n ", "exact") is None
    assert answers_match("hello   world", "hello world", "exact")
    assert not answers_match("Hello world", "hello world", "exact")
    with pytest.raises(ValueError, match="extractor"):
        extract_answer("x", "words")
    assert set(EXTRACTORS) == {"letter", "number", "boxed", "regex", "exact"}


def test_score_match_against_a_full_reference_reply():
    reference = "Let's think step by step. 2 + 2 = 4, which is option (B). The answer is (B)."
    assert score_match("Clearly the answer is (B).", reference, "letter") == Verdict(1.0, True, "ok")
    wrong = score_match("The answer is (A).", reference, "letter")
    assert (wrong.score, wrong.passed, wrong.reason) == (0.0, False, "wrong_answer")
    assert "'A'" in wrong.detail and "'B'" in wrong.detail
    assert score_match("I cannot tell.", reference, "letter").reason == "no_answer"
    with pytest.raises(ValueError, match="no 'letter' answer"):
        score_match("The answer is (B).", "no letter in this reference", "letter")


def test_score_match_against_a_bare_answer():
    assert score_match("So she pays $1,234.00 in all.", "1234", "number", reference_is_answer=True).passed
    assert score_match("#### 18", "18", "number", reference_is_answer=True).passed
    assert score_match("#### 17", "18", "number", reference_is_answer=True).reason == "wrong_answer"
    assert score_match(r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", "boxed", reference_is_answer=True).passed
    assert score_match("The answer is: b", "B", "letter", reference_is_answer=True).passed
    # A bare answer the pattern does not match is taken whole.
    assert reference_answer("Paris", "regex", r"Final: (\w+)", is_answer=True) == "Paris"
    assert reference_answer("Paris", "regex", r"Final: (\w+)", is_answer=False) is None
    assert score_match("Final: Paris", "Paris", "regex", r"Final: (\w+)", reference_is_answer=True).passed
    assert score_match("Final: Rome", "Paris", "regex", r"Final: (\w+)", reference_is_answer=True).score == 0.0


def test_shipped_mmlu_rows_score_against_themselves():
    rows = [json.loads(line) for line in MMLU.read_text().splitlines() if line.strip()]
    replies = [row["messages"][-1]["content"] for row in rows]
    assert all(reference_answer(r, "letter") is not None for r in replies)  # every row is usable
    reference = replies[0]
    letter = reference_answer(reference, "letter")
    assert reference.rstrip().endswith(f"The answer is ({letter}).")
    assert score_match(reference, reference, "letter") == Verdict(1.0, True, "ok")
    other = "A" if letter != "A" else "B"
    assert score_match(reference.replace(f"({letter}).", f"({other})."), reference, "letter").score == 0.0


# ---------------------------------------------------------------- code and tests

PROMPT = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    """
'''
BODY = """    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i != j and abs(a - b) < threshold:
                return True
    return False
"""
CHECK = """

def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True
"""
HUMANEVAL_ROW = {"task_id": "HumanEval/0", "prompt": PROMPT, "entry_point": "has_close_elements", "test": CHECK}
FULL_DEF = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n" + BODY


def test_code_from_a_fenced_block():
    reply = f"Here you go:\n```python\n{FULL_DEF}```\nUsage:\n```\nhas_close_elements([1.0], 0.1)\n```\n"
    code = code_from_reply(reply)
    assert code == FULL_DEF  # the longest block, without the usage one
    # With the entry point known, the defining block wins even when shorter.
    short = "```py\ndef f(x):\n    return x\n```\n```python\n" + "# a long comment\n" * 20 + "```"
    assert code_from_reply(short, entry_point="f") == "def f(x):\n    return x\n"
    assert code_from_reply("```bash\nrm -rf /\n```\nno python here") is None  # other languages are not code


def test_code_from_a_completion_style_body():
    assert code_from_reply(BODY, PROMPT, "has_close_elements") == PROMPT + BODY
    # The same body fenced and flush left is indented under the signature.
    import textwrap

    fenced = f"```python\n{textwrap.dedent(BODY)}```"
    code = code_from_reply(fenced, PROMPT, "has_close_elements")
    assert code.startswith(PROMPT) and "    for i, a in enumerate(numbers):" in code


def test_a_full_definition_keeps_the_prompts_imports():
    code = code_from_reply(f"```python\n{FULL_DEF}```", PROMPT, "has_close_elements")
    assert code.startswith("from typing import List\n") and code.endswith(FULL_DEF)
    namespace: dict = {}
    exec(compile(code, "<test>", "exec"), namespace)  # trusted code written above: List resolves
    assert namespace["has_close_elements"]([1.0, 1.05], 0.1) is True
    # A prompt that does not parse alone lends only its import lines.
    broken = "import math\nfrom typing import List\ndef has_close_elements(\n"
    code = code_from_reply(f"```python\n{FULL_DEF}```", broken, "has_close_elements")
    assert code == "import math\nfrom typing import List\n" + FULL_DEF


def test_no_code_in_the_reply():
    assert code_from_reply("I am sorry, I can't solve this.") is None
    assert code_from_reply("Yes") is None  # a bare word parses as Python but is no program
    assert code_from_reply("", PROMPT, "has_close_elements") is None
    assert code_from_reply("def f():\n    return 1\n") == "def f():\n    return 1\n"  # unfenced code counts


def test_tests_program_shapes():
    assert verify.tests_program(HUMANEVAL_ROW) == CHECK + "\ncheck(has_close_elements)\n"
    mbpp = {"text": "add two numbers", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
            "test_setup_code": "OFFSET = 0", "test_imports": ["import math"]}
    assert verify.tests_program(mbpp) == "import math\nOFFSET = 0\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n"
    assert verify.tests_program({"test_list": ["assert f() == 1"], "test_setup_code": ""}) == "assert f() == 1\n"
    assert verify.tests_program({"tests": "assert f() == 1"}) == "assert f() == 1\n"
    assert verify.tests_program({"tests": ["assert f() == 1", "assert f() != 2"]}) == "assert f() == 1\nassert f() != 2\n"
    assert verify.tests_program({"prompt": "x"}) is None
    assert verify.tests_program({"tests": []}) is None
    # A check() that nothing would call passes every reply: not a test.
    assert verify.tests_program({"test": CHECK}) is None


def test_humaneval_row_canonical_passes_and_wrong_fails():
    assert score_tests(BODY, HUMANEVAL_ROW) == Verdict(1.0, True, "ok")
    assert score_tests(f"Sure:\n```python\n{FULL_DEF}```", HUMANEVAL_ROW).passed
    wrong = score_tests("    return False\n", HUMANEVAL_ROW)
    assert (wrong.reason, wrong.score) == ("failed", 0.0)
    assert wrong.detail.startswith("AssertionError") and "assert candidate(" in wrong.detail
    assert score_tests("I don't know how to do this.", HUMANEVAL_ROW) == Verdict(0.0, False, "no_code",
                                                                                  "no Python code in the reply")
    with pytest.raises(ValueError, match="no tests"):
        score_tests(BODY, {"prompt": PROMPT})


def test_mbpp_row():
    row = {"text": "Add two numbers.", "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
    assert score_tests("```python\ndef add(a, b):\n    return a + b\n```", row).passed
    assert score_tests("```python\ndef add(a, b):\n    return a - b\n```", row).reason == "failed"


# ---------------------------------------------------------------- the sandbox


def test_a_replys_main_block_does_not_run():
    """HumanEval's harness does not run a solution's `if __name__ == "__main__":` demo; neither do we."""
    program = "def f(x):\n    return x + 1\n\nif __name__ == '__main__':\n    input('n? ')\n\nassert f(1) == 2\n"
    assert run_sandboxed(program) == Verdict(1.0, True, "ok")


def test_passes_fails_raises_and_syntax_errors():
    assert run_sandboxed("assert sum([1, 2]) == 3\nprint('noise')") == Verdict(1.0, True, "ok")
    failed = run_sandboxed("x = 1\nassert x == 2, 'x is not 2'")
    assert (failed.reason, failed.detail) == ("failed", "AssertionError: x is not 2 [line 2: assert x == 2, 'x is not 2']")
    raised = run_sandboxed("def f():\n    raise KeyError('k')\nf()")
    assert raised.reason == "failed" and raised.detail.startswith("KeyError: 'k' [line 2")
    syntax = run_sandboxed("def f(:\n    pass")
    assert (syntax.score, syntax.reason) == (0.0, "syntax_error") and "line 1" in syntax.detail
    assert run_sandboxed("import sys\nsys.exit(3)").reason == "failed"
    # Exiting early with status 0 would skip the tests appended after a solution: still not a pass.
    early = run_sandboxed("import sys\nsys.exit(0)\nassert False")
    assert early.reason == "failed" and "SystemExit(0)" in early.detail


def test_hang_times_out_quickly():
    start = time.monotonic()
    verdict = run_sandboxed("while True:\n    pass", timeout_s=2)
    assert verdict.reason == "timeout" and not verdict.passed
    assert time.monotonic() - start < 6


def test_memory_limit():
    assert run_sandboxed("x = bytearray(1 << 30)", memory_mb=256).reason == "memory_limit"
    assert run_sandboxed("x = bytearray(1 << 20)", memory_mb=256).passed  # a little is fine


def test_writing_outside_the_sandbox_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    verdict = run_sandboxed(f"open({str(target)!r}, 'w').write('x')")
    assert verdict.reason == "sandbox_violation" and str(target) in verdict.detail
    assert not target.exists()
    # Nor through a symlink planted in the sandbox, nor by deleting someone else's file.
    program = f"import os\nos.symlink({str(tmp_path)!r}, 'out')\nopen('out/escaped.txt', 'w')"
    assert run_sandboxed(program).reason == "sandbox_violation"
    assert not target.exists()
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    assert run_sandboxed(f"import os\nos.remove({str(keep)!r})").reason == "sandbox_violation"
    assert keep.read_text() == "mine"


def test_refusal_rules_by_hand(tmp_path):
    """The audit hook's decisions, called directly: writes are judged by where they really land."""
    root = tmp_path / "box"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)  # planted by hand: the hook would refuse making it
    root = str(root)
    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    assert verify._refusal("open", (f"{root}/a.txt", "w", write), root) is None
    assert verify._refusal("open", ("/etc/passwd", "r", os.O_RDONLY), root) is None  # reading is allowed
    assert verify._refusal("open", ("/dev/null", "w", write), root) is None
    assert verify._refusal("open", (f"{root}/link/a.txt", "w", write), root) is not None  # out via the symlink
    assert verify._refusal("open", (f"{root}/../a.txt", "w", write), root) is not None
    assert verify._refusal("open", (f"{root}-sibling/a.txt", "w", write), root) is not None  # a prefix is not inside
    assert verify._refusal("os.mkdir", (f"{root}/d", 0o777, -1), root) is None
    assert verify._refusal("os.mkdir", ("d", 0o777, 3), root) is not None  # relative to some directory fd
    assert verify._refusal("os.rename", (f"{root}/a", "/tmp/a", -1, -1), root) is not None
    assert verify._refusal("os.link", ("/etc/passwd", f"{root}/p", -1, -1), root) is not None  # a hard link out
    assert verify._refusal("os.chmod", (5, 0o777, -1), root) is not None  # a descriptor names no path
    assert verify._refusal("os.truncate", (5, 0), root) is None  # ... but truncate's was opened for writing
    assert verify._refusal("socket.getaddrinfo", ("example.com", 80, 0, 0, 0, 0), root) == "socket.getaddrinfo"
    assert verify._refusal("import", ("json", None, [], [], []), root) is None


def test_a_caught_violation_is_still_reported(tmp_path):
    target = tmp_path / "escaped.txt"
    program = f"try:\n    open({str(target)!r}, 'w')\nexcept Exception:\n    pass\nassert True\n"
    assert run_sandboxed(program).reason == "sandbox_violation"
    assert not target.exists()


def test_network_is_refused():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert run_sandboxed("import socket\nsocket.socket()").reason == "sandbox_violation"
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')"
        verdict = run_sandboxed(program)
        assert verdict.reason == "sandbox_violation" and verdict.detail.startswith("socket.")
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected
            server.accept()


def test_processes_and_ctypes_are_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    for program in ["import subprocess\nsubprocess.run(['true'])",
                    f"import os\nos.system('touch {marker}')",
                    "import os\nos.fork()",
                    "import os\nos.kill(os.getppid(), 9)",
                    "import ctypes\nctypes.CDLL('libc.so.6')"]:
        assert run_sandboxed(program).reason == "sandbox_violation", program
    assert not marker.exists()


def test_its_own_directory_is_writable_and_removed_afterwards(monkeypatch):
    program = """
import os, tempfile
with open('out.txt', 'w') as f:
    f.write('hi')
os.mkdir('sub')
os.rename('out.txt', 'sub/out.txt')
assert open('sub/out.txt').read() == 'hi'
with tempfile.NamedTemporaryFile(mode='w') as f:
    f.write('scratch')
"""
    assert run_sandboxed(program) == Verdict(1.0, True, "ok")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:1")
    monkeypatch.setenv("HF_TOKEN", "secret")
    # The child checks its own view, then sends its directory back in an error message.
    program = """
import os
assert os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd()
assert 'HTTPS_PROXY' not in os.environ and 'HF_TOKEN' not in os.environ
raise RuntimeError(os.getcwd())
"""
    verdict = run_sandboxed(program)
    assert verdict.detail.startswith("RuntimeError: ")
    cwd = Path(verdict.detail.split()[1])
    assert cwd.name.startswith("sft-sandbox-") and not cwd.exists()


def test_run_sandboxed_many_keeps_input_order():
    programs = ["import time\ntime.sleep(0.3)\nassert True", "assert False", "raise KeyError('third')",
                "x = (", "assert True"]
    verdicts = run_sandboxed_many(programs, timeout_s=5, workers=2)
    assert [v.reason for v in verdicts] == ["ok", "failed", "failed", "syntax_error", "ok"]
    assert "third" in verdicts[2].detail
    assert run_sandboxed_many([]) == []


# ---------------------------------------------------------------- reward model

CONVERSATIONS = [[{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": reply}]
                 for reply in ("4", "It is five, I think.", "Let me see: 2 + 2 = 4.", "22")]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """reward_dir(num_labels) -> a folder with a tiny random sequence-classification model + tokenizer.
    With one label neither the tokenizer nor the config names a pad token (as many reward models
    ship): RewardModel must supply one, or batches of two or more cannot be scored."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from sft_cli.assets.tiny import tiny_model_dir

    base = str(tiny_model_dir(template="chatml", arch="llama"))
    made = {}

    def build(num_labels: int) -> str:
        if num_labels not in made:
            config = AutoConfig.from_pretrained(base)
            config.num_labels = num_labels
            tokenizer = AutoTokenizer.from_pretrained(base)
            if num_labels == 1:
                config.pad_token_id, tokenizer.pad_token = None, None
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_config(config)
            folder = tmp_path_factory.mktemp(f"reward{num_labels}")
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[num_labels] = str(folder)
        return made[num_labels]

    return build


def test_reward_scores_are_deterministic_and_batch_independent(reward_dir):
    one = RewardModel(reward_dir(1), device="cpu", batch_size=1)
    scores = one.score(CONVERSATIONS)
    assert len(scores) == len(CONVERSATIONS) and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert one.score(CONVERSATIONS) == scores
    batched = RewardModel(reward_dir(1), device="cpu", batch_size=4).score(CONVERSATIONS)
    assert batched == pytest.approx(scores, abs=1e-5)  # right padding: a score does not see its batch
    assert len({round(s, 6) for s in scores}) == len(scores)  # different replies, different scores
    assert one.score([]) == []


def test_reward_with_two_labels_is_a_log_probability(reward_dir):
    model = RewardModel(reward_dir(2), device="cpu", batch_size=3)
    scores = model.score(CONVERSATIONS)
    assert all(math.isfinite(s) and s < 0.0 for s in scores)  # log p('good') of a 2-way softmax
    assert RewardModel(reward_dir(2), device="cpu", batch_size=1).score(CONVERSATIONS) == pytest.approx(scores, abs=1e-5)


def test_reward_truncates_from_the_left_keeping_the_reply(reward_dir):
    tail = "and so on " * 10  # the same last words before the same reply
    first, second = ([{"role": "user", "content": start * 300 + tail}, {"role": "assistant", "content": "4"}]
                     for start in ("blah ", "words "))
    whole = RewardModel(reward_dir(1), device="cpu")
    assert whole.score([first]) != pytest.approx(whole.score([second]), abs=1e-6)
    kept = RewardModel(reward_dir(1), device="cpu", max_length=16)
    # Only the last 16 tokens are kept, and they are the same: the reply survives the cut.
    assert kept.score([first]) == pytest.approx(kept.score([second]), abs=1e-6)
