"""Rewards computed by code, for `reward.function` in an rlhf recipe.

A reward function is `f(prompts, completions, **columns) -> list[float]`: one float per completion. `columns` are the
prompt rows' other columns (gsm8k's `answer`, a coding set's `tests`), one list entry per prompt, so a function takes
the keywords it needs and ignores the rest with `**_`. Write it as "module:function" or "path/to/file.py:function".
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
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


# A best-effort sandbox: no sockets (network calls fail), no more than 512 MB, a wall-clock timeout, an empty
# temporary working directory, and Python's isolated mode. It is not a security boundary against hostile code.
_GUARD = """
import resource, socket
resource.setrlimit(resource.RLIMIT_AS, (512 * 2**20, 512 * 2**20))
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in nlpkit's unit-test reward")
socket.socket = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
del resource, socket
"""


def unit_test_pass(prompts: list[str], completions: list[str], tests: list[str], timeout: float = 5.0,
                   **_) -> list[float]:
    """1.0 when the generated Python (the first ```python block, else the whole completion) followed by the row's
    tests (assert statements) exits 0 in a subprocess within `timeout` seconds, else 0.0."""
    return [_passes(extract_code(c), t, timeout) for c, t in zip(completions, tests)]


def extract_code(completion: str) -> str:
    fenced = re.search(r"```(?:python|py)?\n(.*?)```", completion, re.DOTALL)
    return fenced.group(1) if fenced else completion


def _passes(code: str, tests: str, timeout: float) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        program = Path(scratch) / "candidate.py"
        program.write_text(_GUARD + "\n" + code + "\n\n" + tests + "\n")
        env = {"PATH": os.environ.get("PATH", ""), "no_proxy": "*"}  # nothing else of ours leaks in
        try:
            done = subprocess.run([sys.executable, "-I", str(program)], cwd=scratch, env=env, timeout=timeout,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  check=False)
        except subprocess.TimeoutExpired:
            return 0.0
    return 1.0 if done.returncode == 0 else 0.0


# ---------------------------------------------------------------------------------------------- loading and calling


def load_reward_function(spec: str) -> Callable:
    """'module:function' or 'path/to/file.py:function' -> the callable; errors name reward.function and the fix."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise NlpkitError(f"reward.function {spec!r}: write it as module:function or path/to/file.py:function "
                          "(e.g. nlpkit.rewards:gsm8k_exact_match)")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise NlpkitError(f"reward.function {spec!r}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except NlpkitError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way; say which and how
        raise NlpkitError(f"reward.function {spec!r}: importing {target} failed ({type(e).__name__}: {e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise NlpkitError(f"reward.function {spec!r}: {target} has no function {name!r}")
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
