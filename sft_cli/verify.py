"""Is a generated reply right? The scoring half of `sft generate` (best-of-N rejection sampling).

Three ways to score a reply:

    score_match(reply, reference, "letter")   # extract the final answer, compare it with the reference's
    score_tests(reply, row)                    # run the reply's code against the row's tests, sandboxed
    RewardModel(path).score(conversations)     # a sequence-classification reward model's scalar per reply

    >>> score_match("... so the answer is (C).", "C", "letter", reference_is_answer=True)
    Verdict(score=1.0, passed=True, reason='ok', detail='')

The sandbox and what it is for
------------------------------
run_sandboxed runs model-written code in a separate `python -I` process whose cwd, HOME and TMPDIR
are a fresh temporary directory (removed afterwards), with a minimal environment (no proxies, no
tokens), rlimits (address space, CPU seconds, file size, open files, no core dumps), a wall-clock
timeout that SIGKILLs its whole process group, an empty network namespace when `unshare` may make
one, and a PEP 578 audit hook that refuses sockets, new processes, signals, ctypes, and any file
write, deletion or permission change outside the temporary directory. The hook reports a refusal
before raising, so a `try/except` in the program cannot hide it.

This guards against accidents and naive escapes by model-written code: a solution that deletes
files, forks, phones home, fills the disk or memory, or loops forever. It is NOT a security
boundary. An audit hook lives in the interpreter it watches, so a determined attacker can get
around it (rewrite the hook's closure through `gc`, write through `os.open(..., dir_fd=...)`,
forge the report on the inherited pipe), and reading files stays allowed because the interpreter
must import the standard library. To score generations from an untrusted model or prompt set,
run `sft generate` inside a throwaway container or VM with no network and no secrets mounted.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import types
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext
from fractions import Fraction

EXTRACTORS = ("letter", "number", "boxed", "regex", "exact")


@dataclass(frozen=True)
class Verdict:
    score: float  # 1.0 right / 0.0 wrong for match and tests; the reward model's number for reward
    passed: bool
    reason: str  # short snake_case: "ok", "wrong_answer", "no_answer", "failed", "timeout", ...
    detail: str = ""  # a line for a human: the exception, the answers compared (<= 300 chars)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- final answers

# "The answer is (C).", "Answer: b", "the correct answer is: **D**"; group 1 is "(" when present.
_ANSWER_PHRASE = re.compile(r"\banswer(?:\s+is|\s*:)+[\s*:]*(\()?\s*([A-J])\b", re.IGNORECASE)
_ENUMERATED = re.compile(r"\(([A-J])\)")
# A reply that opens with the option it picks: "C) True, False", "(B) 12".
_LEADING_OPTION = re.compile(r"\s*\(?([A-J])\)[\s.:,]")
_OPTION_MARK = re.compile(r"(?:^|\s)\(?([A-J])\)")  # "C)" or "(C)" after a space or at the start
_LONE_LETTER = re.compile(r"\s*\(?([A-J])\)?\.?\s*", re.IGNORECASE)
# After a bare lower-case letter: punctuation or the end, else "the answer is a number" reads as A.
_LETTER_END = re.compile(r"[ \t]*(?:[.,;:!?)*\n]|\Z)")

# A number not glued to a word or a dot before it (so "x2" and "v1.2" hold none; "-" after a digit is
# a minus sign only when nothing word-like precedes it): a fraction, a 1,234.5, or a plain/scientific one.
_NUMBER = re.compile(r"(?<![\w.])(-?)(?:(\d+)\s*/\s*(0*[1-9]\d*)(?![\d.])|(\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?)"
                     r"|((?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?))")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}|(\d)(\d))")


def _letter(text: str) -> str | None:
    lone = _LONE_LETTER.fullmatch(text)
    if lone:
        return lone.group(1).upper()
    for m in reversed(list(_ANSWER_PHRASE.finditer(text))):
        if m.group(1) or m.group(2).isupper() or _LETTER_END.match(text, m.end()):
            return m.group(2).upper()
    # Without an answer phrase, options named in passing ("(A) is wrong because ...", a restated list
    # "(A) 2, (B) 3, ...") are no answer: only a reply naming one letter alone, in front ("C) True,
    # False") or as "(C)", has one.
    named = set(_ENUMERATED.findall(text)) | set(_OPTION_MARK.findall(text))
    leading = _LEADING_OPTION.match(text)
    if leading and named <= {leading.group(1)}:
        return leading.group(1)
    return named.pop() if len(named) == 1 else None


def _canonical_number(m: re.Match) -> str | None:
    """'3.50' -> '3.5', '1,234' -> '1234', '3/4' -> '0.75', '1/3' -> '1/3', '-0' -> '0'."""
    sign, numerator, denominator, grouped, plain = m.groups()
    try:
        if numerator is not None:
            value = Fraction(int(numerator), int(denominator))
        else:
            exact = Decimal((grouped or plain).replace(",", ""))
            if abs(exact.adjusted()) > 100:  # 1e999999 as a Fraction is a huge integer: keep it a float
                return repr(float(f"{sign}{exact}"))
            value = Fraction(exact)
    except (ValueError, InvalidOperation):  # more digits than int() takes
        return None
    value = -value if sign else value
    if value.denominator == 1:
        return str(value.numerator)
    if _finite_decimal(value.denominator):
        with localcontext() as ctx:
            ctx.prec = 200
            return format((Decimal(value.numerator) / Decimal(value.denominator)).normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def _finite_decimal(denominator: int) -> bool:
    """Whether 1/denominator has a finite decimal expansion (only 2s and 5s divide it)."""
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def _numbers(text: str) -> list[str]:
    return [n for n in map(_canonical_number, _NUMBER.finditer(text)) if n is not None]


def _number(text: str) -> str | None:
    # GSM8K ends its references "#### 72" and MATH boxes the result: the first number there is the
    # answer (not a unit's exponent in \boxed{5\text{ cm}^2}), whatever the working around it mentions.
    marked = [text.rsplit("####", 1)[1]] if "####" in text else []
    boxed = _last_boxed(text)
    if boxed is not None:
        marked.append(_LATEX_FRAC.sub(_frac_as_slash, boxed.replace("{,}", "")))
    for numbers in map(_numbers, marked):
        if numbers:
            return numbers[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def _frac_as_slash(m: re.Match) -> str:
    numerator, denominator = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
    return f"{numerator}/{denominator}"


def _last_boxed(text: str) -> str | None:
    """The raw content of the last \\boxed{...} or \\fbox{...}, braces balanced; None if none or unclosed."""
    opens = list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))
    if not opens:
        return None
    start, depth = opens[-1].end(), 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def _normalise_latex(text: str) -> str | None:
    text = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", text)  # the lookahead spares \leftarrow
    text = re.sub(r"\\[!,;:]", "", text)  # LaTeX's thin/medium/negative spaces
    text = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", text)
    text = re.sub(r"\s+", "", text)
    text = text.rstrip(".").strip("$").rstrip(".")
    return text or None


def _collapse(text: str) -> str | None:
    return " ".join(text.split()) or None


def _check_how(how: str, pattern: str | None = None) -> None:
    if how not in EXTRACTORS:
        raise ValueError(f"unknown answer extractor {how!r}: use one of {', '.join(EXTRACTORS)}")
    if how == "regex" and not pattern:
        raise ValueError("the 'regex' extractor needs a pattern (a Python regex; group 1 is the answer)")


def extract_answer(text: str, how: str, pattern: str | None = None) -> str | None:
    """The final answer in `text`, normalised for `how` (one of EXTRACTORS), or None when there is none.

    letter: A-J from the last 'answer is (X)' / 'Answer: X' phrase, else the last '(X)', else a lone 'X'.
    number: the number after '####', else in the last \\boxed{}, else the last one; canonical ('3.5', '1234').
    boxed:  the last \\boxed{}/\\fbox{} content without spaces, $...$, a final '.', \\left/\\right; \\dfrac -> \\frac.
    regex:  the last match of `pattern`: its group 1 if it has groups, else the whole match; stripped.
    exact:  the whole text, whitespace collapsed.
    """
    _check_how(how, pattern)
    if how == "letter":
        return _letter(text)
    if how == "number":
        return _number(text)
    if how == "boxed":
        boxed = _last_boxed(text)
        return None if boxed is None else _normalise_latex(boxed)
    if how == "regex":
        compiled = re.compile(pattern)
        found = [m.group(1) if compiled.groups else m.group(0) for m in compiled.finditer(text)]
        found = [f.strip() for f in found if f is not None and f.strip()]  # an optional group may not take part
        return found[-1] if found else None
    return _collapse(text)


def _as_float(text: str) -> float | None:
    """'1,234' -> 1234.0, '3/4' -> 0.75, '\\frac{1}{2}' -> 0.5; None when `text` is not one number."""
    text = _LATEX_FRAC.sub(_frac_as_slash, text.replace("{,}", "")).replace(",", "").strip()
    with contextlib.suppress(ValueError):
        return float(text)
    numerator, slash, denominator = text.partition("/")
    try:
        return float(numerator) / float(denominator) if slash else None
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str, how: str) -> bool:
    """Whether two extracted answers agree: numbers within a relative 1e-6 ('0.5' == '1/2'), letters
    in any case, boxed LaTeX as normalised strings (or as numbers when both are one), others as
    whitespace-collapsed strings."""
    _check_how(how, "unused")
    if how == "letter":
        return predicted.strip().upper() == reference.strip().upper()
    if how in ("number", "boxed"):
        a, b = _as_float(predicted), _as_float(reference)
        if a is not None and b is not None:
            return math.isclose(a, b, rel_tol=1e-6)
        if how == "boxed":
            return _normalise_latex(predicted) == _normalise_latex(reference)
    return _collapse(predicted) == _collapse(reference)


def reference_answer(reference: str, how: str, pattern: str | None = None, is_answer: bool = False) -> str | None:
    """The answer a reference holds, or None. A bare answer (`is_answer`) that the extractor finds
    nothing in, e.g. 'Paris' under a regex for 'Final: (.*)', is taken whole, normalised for `how`."""
    answer = extract_answer(reference, how, pattern)
    if answer is None and is_answer:
        answer = _normalise_latex(reference) if how == "boxed" else _collapse(reference)
        answer = answer.upper() if answer and how == "letter" else answer
    return answer


def score_match(reply: str, reference: str, how: str, pattern: str | None = None,
                reference_is_answer: bool = False) -> Verdict:
    """1.0 when the reply's final answer matches the reference's. `reference` is the bare answer
    (`reference_is_answer`) or a full reference reply to extract it from; one holding no answer
    raises ValueError, so the caller can reject that row when it loads the prompts."""
    expected = reference_answer(reference, how, pattern, is_answer=reference_is_answer)
    if expected is None:
        raise ValueError(f"the reference holds no '{how}' answer: {_short(reference, 120)!r}")
    got = extract_answer(reply, how, pattern)
    if got is None:
        return Verdict(0.0, False, "no_answer", f"no '{how}' answer in the reply")
    if answers_match(got, expected, how):
        return Verdict(1.0, True, "ok")
    return Verdict(0.0, False, "wrong_answer", _short(f"got {got!r}, expected {expected!r}"))


# ---------------------------------------------------------------- code and its tests

# A fenced block: its language tag and body; an unclosed last fence (a reply cut at max_new_tokens) runs to the end.
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.MULTILINE | re.DOTALL)
_PYTHON_TAGS = ("", "python", "py", "python3", "py3")
_IMPORT_LINE = re.compile(r"^(?:from[ \t]+[\w.]+[ \t]+import[ \t]+[^\n(]+|import[ \t]+[\w., \t]+)$", re.MULTILINE)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte
        return False
    return True


def _looks_like_code(text: str) -> bool:
    """Parses as Python and is more than a bare word or literal ('Yes', '42' parse too)."""
    if not _parses(text):
        return False
    return any(not (isinstance(s, ast.Expr) and isinstance(s.value, (ast.Constant, ast.Name)))
               for s in ast.parse(text).body)


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.MULTILINE) is not None


def _returns_at_top_level(code: str) -> bool:
    """Whether `code` parses with a `return` outside any def: a function body written flush left."""
    try:
        stack = list(ast.parse(code).body)
    except (SyntaxError, ValueError):
        return False
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Return):
            return True
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))
    return False


def _complete(prompt: str, body: str) -> str:
    """A HumanEval prompt (signature + docstring) followed by the function body a model wrote."""
    head = prompt if prompt.endswith("\n") else prompt + "\n"
    # Chat models often write the body flush left (it would then run at module level, after the stub).
    return head + (textwrap.indent(body, "    ") if _returns_at_top_level(body) else body)


def code_from_reply(reply: str, prompt: str | None = None, entry_point: str | None = None) -> str | None:
    """The Python program in a model's reply, or None when it holds no code.

    The fenced ```python / ```py / ``` block that defines `entry_point`, else the longest fenced
    block, else the whole reply when it is code (or a bare function body that completes `prompt`).
    A body (no `def entry_point(` in the code but one in the prompt) is appended to the prompt.
    A full definition gets the prompt in front of it, so the prompt's imports and helper functions
    exist (the reply's def then replaces the prompt's stub); only its import lines when the prompt
    alone does not parse.
    """
    blocks = [body for tag, body in _FENCE.findall(reply) if tag.lower() in _PYTHON_TAGS and body.strip()]
    if blocks:
        defining = [b for b in blocks if entry_point and _defines(b, entry_point)]
        code = max(defining or blocks, key=len)
    elif _looks_like_code(textwrap.dedent(reply)):  # dedented: a bare function body is code too
        code = reply
    else:
        return None
    if not prompt:
        return code
    if entry_point and _defines(prompt, entry_point) and not _defines(code, entry_point):
        return _complete(prompt, code)
    if not entry_point and not _parses(code) and _parses(_complete(prompt, code)):
        return _complete(prompt, code)
    if entry_point and _defines(code, entry_point):
        if _defines(prompt, entry_point) and _parses(prompt):  # a stub: signature + docstring
            return prompt.rstrip("\n") + "\n\n\n" + code
        missing = [line for line in _IMPORT_LINE.findall(prompt) if line not in code]
        return "\n".join([*missing, code]) if missing else code
    return code


def _lines(value: object) -> list[str]:
    """A row field holding code: a string, or a list of strings (one statement each)."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


def tests_program(row: dict) -> str | None:
    """The test code a row carries, or None:

    HumanEval  row['test'] defines check(candidate); run as test + 'check(<row["entry_point"]>)'
    MBPP       row['test_list'] asserts, after row['test_imports'] and row['test_setup_code']
    generic    row['tests']: Python code, or a list of assert statements
    """
    test, entry_point = row.get("test"), row.get("entry_point")
    if isinstance(test, str) and test.strip():
        if isinstance(entry_point, str) and entry_point:
            return f"{test}\ncheck({entry_point})\n"
        # A check() nobody calls would pass every reply; a row like that has no usable tests.
        return None if re.search(r"^def[ \t]+check[ \t]*\(", test, re.MULTILINE) else test + "\n"
    asserts = _lines(row.get("test_list"))
    if asserts:
        return "\n".join([*_lines(row.get("test_imports")), *_lines(row.get("test_setup_code")), *asserts]) + "\n"
    tests = _lines(row.get("tests"))
    return "\n".join(tests) + "\n" if tests else None


def score_tests(reply: str, row: dict, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> Verdict:
    """Run the reply's code followed by the row's tests in the sandbox: 1.0 when every test passes.
    A row with no tests raises ValueError (the caller rejects it when it loads the prompts)."""
    tests = tests_program(row)
    if tests is None:
        raise ValueError("the row has no tests: expected 'test' + 'entry_point' (HumanEval), 'test_list' (MBPP) "
                         "or 'tests'")
    prompt, entry_point = row.get("prompt"), row.get("entry_point")
    code = code_from_reply(reply, prompt if isinstance(prompt, str) else None,
                           entry_point if isinstance(entry_point, str) else None)
    if code is None:
        return Verdict(0.0, False, "no_code", "no Python code in the reply")
    return run_sandboxed(f"{code}\n\n{tests}", timeout_s=timeout_s, memory_mb=memory_mb)


# ---------------------------------------------------------------- the sandbox

_PROGRAM_FILE = "solution.py"
_CHILD_FLAG = "--sandbox-child"
_THIS_FILE = os.path.realpath(__file__)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# Refused outright: new processes, signals, leaving the network namespace, loosening the limits.
_DENIED = frozenset({
    "subprocess.Popen", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
    "os.startfile", "os.kill", "os.killpg", "signal.pthread_kill", "os.unshare", "os.setns",
    "resource.setrlimit", "resource.prlimit", "sys.remote_exec", "webbrowser.open",
})
_DENIED_PREFIXES = ("socket.", "ctypes.")  # any network use; loading or calling foreign code
# Events that change the file system: (arguments that are paths, arguments that are dir_fds, -1 = none).
_FS_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((0, 1), (2,)),
    "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()),
    "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "shutil.rmtree": ((0,), (1,)),
    "shutil.copyfile": ((1,), ()), "shutil.copymode": ((1,), ()), "shutil.copystat": ((1,), ()),
    "shutil.copytree": ((1,), ()), "shutil.chown": ((0,), ()), "shutil.make_archive": ((0,), ()),
    "shutil.unpack_archive": ((1,), ()),
}


def _inside(path: object, root: str) -> bool:
    try:
        # realpath: a symlink in the sandbox that points out of it leads out of it.
        real = os.path.realpath(os.fsdecode(os.fspath(path)))
    except (TypeError, ValueError):
        return False
    return real == root or real.startswith(root + os.sep)


def _refusal(event: str, args: tuple, root: str) -> str | None:
    """Why the sandboxed program may not do audit `event`, or None when it may. `root`: its directory's real path."""
    if event == "open":  # reads stay allowed: every import opens files
        path, _, flags, *_ = (*args, None, None, None)
        if not isinstance(flags, int) or not flags & _WRITE_FLAGS or isinstance(path, int) or \
                path in ("/dev/null", b"/dev/null") or _inside(path, root):
            return None
        return f"open {path!r} for writing, outside the sandbox directory"
    if event in _DENIED or event.startswith(_DENIED_PREFIXES):
        return event
    if event not in _FS_EVENTS:
        return None
    paths, dir_fds = _FS_EVENTS[event]
    if any(i < len(args) and args[i] not in (None, -1) for i in dir_fds):
        return f"{event} relative to a directory descriptor"
    for path in (args[i] for i in paths if i < len(args)):
        # A descriptor names no path; only truncate's is safe, as its file was opened for writing.
        if path is not None and not (isinstance(path, int) and event == "os.truncate") and \
                (isinstance(path, int) or not _inside(path, root)):
            return f"{event} {path!r}, outside the sandbox directory"
    return None


def _describe(error: BaseException, source: str) -> str:
    """'AssertionError: msg [line 12: assert f(1) == 2]': the error and the program line it came from."""
    try:
        message = str(error)
    except Exception:  # a user-defined __str__ may raise too
        message = ""
    line, tb = 0, error.__traceback__
    while tb is not None:
        line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == _PROGRAM_FILE else line
        tb = tb.tb_next
    text = f"{type(error).__name__}: {_short(message)}" if message else type(error).__name__
    lines = source.splitlines()
    return _short(f"{text} [line {line}: {lines[line - 1].strip()}]" if 0 < line <= len(lines) else text)


def _child_main(root: str, report_fd: int, timeout_s: float, memory_mb: int) -> None:
    """The sandboxed process: limits, the audit hook, then the program. Writes JSON lines to `report_fd`:
    {"event": "violation", ...} at the first refusal, {"event": "end", "reason", "detail"} if it gets to the end."""
    import ctypes  # noqa: F401  before the hook: numpy imports ctypes, whose own dlopen(None) would be refused
    import resource

    def report(**fields: str) -> None:
        with contextlib.suppress(OSError):
            os.write(report_fd, (json.dumps(fields) + "\n").encode())

    # No RLIMIT_NPROC: it counts every process and thread of the user (so threads would break, and a
    # root caller ignores it); the hook refuses fork/exec/spawn instead.
    cpu_s = math.ceil(timeout_s) + 1  # past the wall clock: the parent's timeout normally fires first
    for limit, soft, hard in ((resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
                              (resource.RLIMIT_CPU, cpu_s, cpu_s + 1), (resource.RLIMIT_FSIZE, 16 << 20, 16 << 20),
                              (resource.RLIMIT_NOFILE, 64, 64), (resource.RLIMIT_CORE, 0, 0)):
        ceiling = resource.getrlimit(limit)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(limit, (soft, hard))
    with open(os.path.join(root, _PROGRAM_FILE), encoding="utf-8") as f:
        source = f.read()

    reported = False

    def hook(event: str, args: tuple) -> None:
        nonlocal reported
        why = _refusal(event, args, root)
        if why is not None:
            if not reported:  # reported before raising: the program may catch the PermissionError
                report(event="violation", detail=_short(why))
                reported = True
            raise PermissionError(f"sandbox: {why}")

    sys.addaudithook(hook)
    # A module of its own, not __main__: a reply's `if __name__ == "__main__":` demo (input(), unittest.main())
    # must not run, as HumanEval's own harness does not run it.
    module = types.ModuleType("solution")
    module.__file__ = os.path.join(root, _PROGRAM_FILE)
    sys.modules["__main__"] = module
    reason, detail = "ok", ""
    try:
        code = compile(source, _PROGRAM_FILE, "exec")
    except SyntaxError as e:
        reason, detail = "syntax_error", f"{type(e).__name__}: {e.msg} [line {e.lineno}]"
    else:
        try:
            exec(code, module.__dict__)
        except MemoryError:
            reason, detail = "memory_limit", "MemoryError"
        except SystemExit as e:
            # Exiting early, even with 0, skips the tests that follow the solution: not a pass.
            reason, detail = "failed", f"SystemExit({e.code!r}) before the end of the program"
        except BaseException as e:
            reason, detail = "failed", _describe(e, source)
    module.__dict__.clear()  # let go of what the program built: after a MemoryError little memory is left
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    report(event="end", reason=reason, detail=_short(detail))
    os._exit(0 if reason == "ok" else 1)  # skips atexit hooks and the program's leftover threads


@functools.lru_cache(maxsize=1)
def _network_namespace() -> tuple[str, ...]:
    """The `unshare` command prefix that gives the child an empty network namespace, or () where this
    kernel or user may not make one. A user namespace without a uid map makes the child 'nobody'
    with no capabilities, even when the caller is root."""
    unshare = shutil.which("unshare")
    for options in (("--user", "--net"), ("--net",)) if unshare else ():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([unshare, *options, "true"], capture_output=True, timeout=10).returncode == 0:
                return (unshare, *options, "--")
    return ()


def _child_env(root: str) -> dict[str, str]:
    # Nothing of the caller's environment: no proxies, tokens or PYTHON* settings. One math-library
    # thread keeps numpy's per-thread buffers inside RLIMIT_AS.
    return {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _read_reports(read_fd: int) -> list[dict]:
    """The child's JSON lines; closes `read_fd`. Non-blocking: nothing may hold the pipe's other end open."""
    os.set_blocking(read_fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(read_fd, 1 << 16):
            chunks.append(chunk)
    os.close(read_fd)
    reports = []
    for line in b"".join(chunks).splitlines():
        with contextlib.suppress(ValueError):
            reports.append(json.loads(line))
    return [r for r in reports if isinstance(r, dict)]


def _verdict(reports: list[dict], returncode: int, timed_out: bool, output: str, timeout_s: float) -> Verdict:
    """How the child ended, from its reports, its exit status and the tail of its output."""
    violation = next((r for r in reports if r.get("event") == "violation"), None)
    end = next((r for r in reversed(reports) if r.get("event") == "end"), None)
    if violation is not None:
        return Verdict(0.0, False, "sandbox_violation", str(violation.get("detail", "")))
    # SIGXCPU: RLIMIT_CPU's soft limit; SIGKILL: its hard limit (or the parent, on the wall clock).
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return Verdict(0.0, False, "timeout", f"still running after {timeout_s:g} s")
    if end is not None and end.get("reason") != "ok":
        return Verdict(0.0, False, str(end.get("reason")), str(end.get("detail", "")))
    if end is not None and returncode == 0:
        return Verdict(1.0, True, "ok")
    if "MemoryError" in output:  # died under RLIMIT_AS before it could report
        return Verdict(0.0, False, "memory_limit", "MemoryError")
    last_line = output.strip().splitlines()[-1] if output.strip() else ""
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    return Verdict(0.0, False, "crashed" if returncode < 0 else "failed",
                   _short(f"{how} before the end of the program; {last_line}".rstrip("; ")))


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the child; past `timeout_s`, SIGKILL its whole process group. True when it timed out."""
    try:
        proc.wait(timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def run_sandboxed(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> Verdict:
    """Run untrusted Python `program` in a sandboxed subprocess (see the module docstring) and say how it
    ended: 'ok' (ran to its end), 'failed' (an exception or exit; detail: the error and line),
    'syntax_error', 'sandbox_violation', 'memory_limit', 'timeout' or 'crashed'. Its output is
    captured (a temp file, capped by RLIMIT_FSIZE) and never printed."""
    with tempfile.TemporaryDirectory(prefix="sft-sandbox-", ignore_cleanup_errors=True) as tmp, \
            tempfile.TemporaryFile() as output:
        root = os.path.realpath(tmp)
        with open(os.path.join(root, _PROGRAM_FILE), "w", encoding="utf-8") as f:
            f.write(program)
        read_fd, write_fd = os.pipe()  # the child's reports: the program's own output cannot mix in
        try:
            command = [*_network_namespace(), sys.executable, "-I", "-B", "-X", "utf8", _THIS_FILE, _CHILD_FLAG,
                       root, str(write_fd), repr(float(timeout_s)), str(int(memory_mb))]
            proc = subprocess.Popen(command, cwd=root, env=_child_env(root), stdin=subprocess.DEVNULL,
                                    stdout=output, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                                    start_new_session=True)  # its own process group, killed whole on timeout
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        timed_out = _wait(proc, timeout_s)
        reports = _read_reports(read_fd)
        output.seek(max(0, output.seek(0, os.SEEK_END) - 4000))
        tail = output.read().decode("utf-8", "replace")
    return _verdict(reports, proc.returncode, timed_out, tail, timeout_s)


def run_sandboxed_many(programs: list[str], *, timeout_s: float = 10.0, memory_mb: int = 1024,
                       workers: int | None = None) -> list[Verdict]:
    """run_sandboxed over `programs`, `workers` (default: one per CPU) at a time; verdicts in input order."""
    from concurrent.futures import ThreadPoolExecutor

    run = functools.partial(run_sandboxed, timeout_s=timeout_s, memory_mb=memory_mb)
    # Threads only wait on their subprocess, so the GIL is no bottleneck.
    with ThreadPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1)) as pool:
        return list(pool.map(run, programs))


# ---------------------------------------------------------------- reward model


class RewardModel:
    """A sequence-classification reward model (AutoModelForSequenceClassification + its tokenizer)
    scoring whole conversations: one float each, higher is better.

        rm = RewardModel("Skywork/Skywork-Reward-V2-Qwen3-0.6B", dtype="bfloat16")
        rm.score([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])
    """

    def __init__(self, path: str, device: str | None = None, dtype: str = "float32", batch_size: int = 8,
                 max_length: int = 4096, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Right padding leaves every real token where it is unpadded (same positions, same causal
        # attention), so a score does not depend on its batch; left truncation keeps the reply.
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
        # The classifier reads the logits at the last token that is not padding, found by this id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()

    def _render(self, messages: list[dict]) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    def score(self, conversations: list[list[dict]]) -> list[float]:
        """One reward per conversation (OpenAI messages ending with the assistant reply): the single
        logit, or with two or more labels the log-probability of the last ('good') one."""
        import torch

        texts = [self._render(c) for c in conversations]
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                # A chat template writes its own BOS; the tokenizer adding one more would shift every score.
                batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt",
                                       add_special_tokens=not self.tokenizer.chat_template)
                logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device)).logits.float()
                # logits: (batch, num_labels)
                if logits.shape[-1] == 1:
                    scores.extend(logits[:, 0].tolist())
                else:
                    scores.extend((logits[:, -1] - torch.logsumexp(logits, dim=-1)).tolist())
        return scores


if __name__ == "__main__" and sys.argv[1:2] == [_CHILD_FLAG]:  # run_sandboxed's child process
    _child_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
