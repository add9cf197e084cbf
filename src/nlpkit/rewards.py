"""Rewards computed by code, for `reward.function` in an rlhf recipe and `--reward` in `nlpkit sample`.

A reward function is `f(prompts, completions, **columns) -> list[float]`: one float per completion. `columns` are the
prompt rows' other columns (gsm8k's `answer`; a code set's `test_list` and `test_setup_code`, or one `tests` string),
one list entry per prompt, so a function takes the keywords it needs and ignores the rest with `**_`. Write it as
"module:function", "path/to/file.py:function", or the bare name of a shipped one (SHIPPED).
"""

from __future__ import annotations

import ast
import builtins
import concurrent.futures
import difflib
import functools
import importlib
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from nlpkit.errors import NlpkitError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_exact_match(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 when the number after `####` in the completion equals the one after `####` in the reference answer."""
    return [1.0 if (got := final_number(c)) is not None and got == final_number(a) else 0.0
            for c, a in zip(completions, answer)]


def final_number(text: str) -> str | None:
    """The number after the last `####` (GSM8K's answer line), normalised: 1,000 -> 1000, 18.0 -> 18."""
    _, sep, tail = text.rpartition("####")
    match = NUMBER.search(tail) if sep else None
    if match is None:
        return None
    return match.group().replace(",", "").removesuffix(".0")


# ---------------------------------------------------------------------------------------------- unit tests


def unit_test_pass(prompts: list[str], completions: list[str], timeout: float = 5.0, **columns) -> list[float]:
    """1.0 when the generated code and every assert of the row run without error in the sandbox, else 0.0."""
    return [float(bool(passed) and all(passed)) for passed in _results(completions, columns, timeout)]


def unit_test_fraction(prompts: list[str], completions: list[str], timeout: float = 5.0, **columns) -> list[float]:
    """The share of the row's asserts that pass: partial credit a small model can climb before it passes them all."""
    return [sum(passed) / len(passed) if passed else 0.0 for passed in _results(completions, columns, timeout)]


def compiles(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 when the code parses and defines every function the row's asserts call (no subprocess: cheap)."""
    scores = []
    for completion, (setup, asserts) in zip(completions, row_tests(len(completions), **columns)):
        try:
            tree = ast.parse(extract_code(completion))
        except (SyntaxError, ValueError):
            scores.append(0.0)
            continue
        needed = called_names(asserts) - defined_names(setup) - set(dir(builtins))
        scores.append(1.0 if needed <= defined_names(tree) else 0.0)
    return scores


def extract_code(completion: str) -> str:
    """The first ```python block (an unclosed one runs to the end: the completion was cut), else the whole text."""
    fenced = re.search(r"```(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", completion, re.DOTALL)
    return fenced.group(1) if fenced else completion


def row_tests(count: int, test_list: list | None = None, test_setup_code: list | None = None,
              tests: list | None = None, **_) -> list[tuple[str, list[str]]]:
    """(setup code, asserts) per row: MBPP's columns, or one `tests` string whose top-level asserts are the tests and
    whose other statements are setup."""
    if test_list is not None:
        setups = test_setup_code or [""] * count
        return [(setup or "", list(asserts)) for setup, asserts in zip(setups, test_list)]
    if tests is None:
        raise ValueError("the prompt rows have no test_list (MBPP) or tests column to run the code against")
    split = []
    for text in tests:
        try:
            body = ast.parse(text).body
        except SyntaxError:
            split.append(("", [text]))  # run as is: it fails the same way for every candidate
            continue
        asserts = [ast.get_source_segment(text, s) for s in body if isinstance(s, ast.Assert)]
        setup = "\n".join(ast.get_source_segment(text, s) for s in body if not isinstance(s, ast.Assert))
        split.append((setup, asserts) if asserts else ("", [text]))
    return split


def called_names(asserts: list[str]) -> set[str]:
    names = set()
    for text in asserts:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        names |= {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return names


def defined_names(code: str | ast.Module) -> set[str]:
    """Names a module binds at its top level: functions, classes, assignments (`f = lambda ...`), imports."""
    try:
        tree = ast.parse(code) if isinstance(code, str) else code
    except SyntaxError:
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


# ---------------------------------------------------------------------------------------------- the sandbox

# OS limits on the child, set before the candidate runs: address space, CPU seconds, bytes per written file, and no
# new processes (RLIMIT_NPROC; root ignores it, so the audit hook below refuses fork and exec as well).
MEMORY_BYTES = 512 * 2**20
FILE_BYTES = 16 * 2**20

# Runs in `python -I -B -c` with cwd = a fresh temporary directory and an empty environment. It reads the job, sets
# the limits, installs an audit hook (PEP 578) that refuses sockets, processes, ctypes, /proc, and any write, delete
# or rename outside that directory; hides os.environ; then runs the code, then the setup (MBPP's builds objects of
# the code's classes), then each assert on its own, and writes which asserts passed to the stdout it kept (the
# candidate's own output goes to /dev/null).
# A best-effort sandbox for a model's mistakes, not a security boundary against hostile code.
_RUNNER = r"""
import json, os, resource, sys
scratch = os.path.realpath(os.getcwd())
with open("job.json", encoding="utf-8") as f:
    job = json.load(f)
result = os.dup(1)
quiet = os.open(os.devnull, os.O_WRONLY)
os.dup2(quiet, 1)
os.dup2(quiet, 2)
for limit, value in ((resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_CPU, job["cpu"]),
                     (resource.RLIMIT_FSIZE, job["fsize"]), (resource.RLIMIT_NPROC, 0)):
    resource.setrlimit(limit, (value, value))
REFUSED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "os.kill", "os.killpg", "pty.", "ctypes.", "os.putenv", "os.unsetenv", "os.symlink", "os.link", "mmap.",
           "signal.pthread_kill", "resource.setrlimit", "resource.prlimit", "sys.remote_exec")
PATHS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
         "os.chflags", "shutil.")
WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
def inside(path):
    if isinstance(path, int):
        return True  # a descriptor the process already holds
    full = os.path.abspath(os.fsdecode(path))
    return full == scratch or full.startswith(scratch + os.sep)
def hook(event, args):
    if event.startswith(REFUSED):
        raise PermissionError(f"{event} is refused in nlpkit's unit-test sandbox")
    if event == "open":
        path, mode, flags = args
        if isinstance(path, (str, bytes)) and os.fsdecode(path).startswith("/proc"):
            raise PermissionError("/proc is refused in nlpkit's unit-test sandbox")
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & WRITE)
        if writes and not inside(path):
            raise PermissionError(f"writing {path!r} outside its directory is refused in nlpkit's unit-test sandbox")
    elif event.startswith(PATHS):
        if not all(inside(a) for a in args if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"{event} outside its directory is refused in nlpkit's unit-test sandbox")
class NoEnvironment(dict):
    def refuse(self, *args, **kwargs):
        raise PermissionError("environment variables are not readable in nlpkit's unit-test sandbox")
    __getitem__ = __iter__ = __len__ = __contains__ = get = keys = items = values = copy = __repr__ = refuse
import posix
os.environ = os.environb = posix.environ = NoEnvironment()
sys.addaudithook(hook)
del hook, posix
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(job["code"], "candidate.py", "exec"), namespace)
    exec(compile(job["setup"], "setup.py", "exec"), namespace)
    ran = True
except BaseException:
    ran = False
passed = []
for test in job["asserts"]:
    try:
        exec(compile(test, "test.py", "exec"), namespace) if ran else None
        passed.append(ran)
    except BaseException:
        passed.append(False)
os.write(result, json.dumps(passed).encode())
os._exit(0)
"""


def _results(completions: list[str], columns: dict, timeout: float) -> list[list[bool]]:
    """Which asserts pass, per completion; candidates run in parallel, one subprocess each, up to one per core."""
    jobs = [(extract_code(c), setup, tuple(asserts), timeout)
            for c, (setup, asserts) in zip(completions, row_tests(len(completions), **columns))]
    unique = list(dict.fromkeys(jobs))
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(unique), os.cpu_count() or 1) or 1) as pool:
        done = dict(zip(unique, pool.map(lambda job: _cached_run(*job), unique)))
    return [list(done[job]) for job in jobs]


@functools.lru_cache(maxsize=4096)  # unit_test_pass and unit_test_fraction on the same candidates share one run
def _cached_run(code: str, setup: str, asserts: tuple[str, ...], timeout: float) -> tuple[bool, ...]:
    return tuple(run_in_sandbox(code, setup, asserts, timeout))


def run_in_sandbox(code: str, setup: str, asserts: tuple[str, ...], timeout: float) -> list[bool]:
    """One candidate in a fresh temporary directory: which of its asserts passed (all False when it hung, was
    killed, or broke the runner). The process group is killed at the end, so nothing it started survives."""
    failed = [False] * len(asserts)
    with tempfile.TemporaryDirectory(prefix="nlpkit-sandbox-") as scratch:
        job = {"setup": setup, "code": code, "asserts": list(asserts), "memory": MEMORY_BYTES,
               "cpu": math.ceil(timeout) + 1, "fsize": FILE_BYTES}
        Path(scratch, "job.json").write_text(json.dumps(job), encoding="utf-8")
        child = subprocess.Popen([sys.executable, "-I", "-B", "-c", _RUNNER], cwd=scratch, env={},
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        try:
            out, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out = None
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.communicate()
    try:
        passed = json.loads(out) if out else failed
    except ValueError:
        return failed
    if not (isinstance(passed, list) and len(passed) == len(asserts)):
        return failed
    return [p is True for p in passed]


# ---------------------------------------------------------------------------------------------- loading and calling

SHIPPED = {f.__name__: f for f in (gsm8k_exact_match, unit_test_pass, unit_test_fraction, compiles)}


def load_reward_function(spec: str, key: str = "reward.function") -> Callable:
    """A shipped name, 'module:function' or 'path/to/file.py:function' -> the callable; errors name `key` and the
    fix."""
    if ":" not in spec:
        if spec in SHIPPED:
            return SHIPPED[spec]
        close = difflib.get_close_matches(spec, list(SHIPPED), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"shipped: {', '.join(SHIPPED)}"
        raise NlpkitError(f"{key} {spec!r}: no such reward function; {hint} (or write it as module:function or "
                          "path/to/file.py:function)")
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise NlpkitError(f"{key} {spec!r}: write it as module:function or path/to/file.py:function "
                          "(e.g. nlpkit.rewards:gsm8k_exact_match)")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise NlpkitError(f"{key} {spec!r}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except NlpkitError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way; say which and how
        raise NlpkitError(f"{key} {spec!r}: importing {target} failed ({type(e).__name__}: {e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise NlpkitError(f"{key} {spec!r}: {target} has no function {name!r}")
    return function


def call_reward_function(spec: str, function: Callable, prompts: list[str], completions: list[str],
                         columns: dict[str, list]) -> list[float]:
    """Call one reward function and check what it returns: one finite float per completion."""
    try:
        values = function(prompts, completions, **columns)
    except Exception as e:  # noqa: BLE001 - a failing user function is bad input, not an nlpkit bug
        raise NlpkitError(f"reward.function {spec}: raised {type(e).__name__}: {e} (on {len(completions)} "
                          "completions); fix the function") from None
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise NlpkitError(f"reward.function {spec}: must return a list of numbers, got {type(values).__name__}") \
            from None
    if len(values) != len(completions):
        raise NlpkitError(f"reward.function {spec}: returned {len(values)} values for {len(completions)} "
                          "completions; return one float per completion")
    if not all(math.isfinite(v) for v in values):
        raise NlpkitError(f"reward.function {spec}: returned a NaN or infinite value; return finite floats")
    return values
