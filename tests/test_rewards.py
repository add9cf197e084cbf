"""Rewards computed by code: unit tests in the sandbox (what a generated program may try, and what it gets), partial
credit, the compiles term, and the pass@k estimator."""

import os
import time

import pytest

from nlpkit.rewards import compiles, extract_code, unit_test_fraction, unit_test_pass
from nlpkit.sample import pass_at_k, pass_rates

ASSERTS = ["assert add(2, 3) == 5", "assert add(1, 1) == 2", "assert add(-1, 1) == 0"]
RIGHT = "def add(a, b):\n    return a + b\n"


def run_all(completions, timeout=3.0):
    columns = {"test_list": [ASSERTS] * len(completions), "test_setup_code": [""] * len(completions)}
    return unit_test_pass([], completions, timeout=timeout, **columns), unit_test_fraction(
        [], completions, timeout=timeout, **columns)


def test_partial_credit_counts_the_asserts_that_pass():
    completions = [
        f"Here it is:\n```python\n{RIGHT}```\nDone.",  # fenced
        RIGHT,  # plain text
        "def add(a, b):\n    return a + b if a > 0 else 7",  # 2 of 3: add(-1, 1) is wrong
        "def add(a, b):\n    return a * b",  # 0 of 3
        "def add(a, b) return a + b",  # does not parse
        "def plus(a, b):\n    return a + b",  # the wrong name
    ]
    passed, fraction = run_all(completions)
    assert passed == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert fraction == pytest.approx([1.0, 1.0, 2 / 3, 0.0, 0.0, 0.0])
    assert compiles([], completions, test_list=[ASSERTS] * len(completions)) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_setup_code_runs_after_the_code_and_a_tests_string_still_works():
    # MBPP's test_setup_code builds objects of the code's classes (task 927), so it runs after the code
    code = "class Box:\n    def __init__(self, v):\n        self.v = v\ndef unbox(b):\n    return b.v\n"
    assert unit_test_pass([], [code], test_list=[["assert unbox(box) == 3"]], test_setup_code=["box = Box(3)"]) == [1.0]
    tests = "import math\nassert add(2, 3) == 5\nassert add(1, 1) == 2"
    assert unit_test_fraction([], [RIGHT, "def add(a, b):\n    return 5"], tests=[tests] * 2) == [1.0, 0.5]


def test_extract_code_takes_the_first_fenced_block_or_the_whole_text():
    assert extract_code("text\n```python\nx = 1\n```\nmore\n```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut at max tokens
    assert extract_code("x = 1") == "x = 1"


def test_the_sandbox_scores_hostile_programs_zero_and_nothing_outside_changes(tmp_path, monkeypatch):
    """Each program would pass its asserts if the sandbox let it do its thing; each scores 0, the good one beside
    them still scores 1, and nothing outside the temporary directory was created or read."""
    monkeypatch.setenv("NLPKIT_TEST_SECRET", "hunter2")
    escape, touched = tmp_path / "escape.txt", tmp_path / "touched.txt"
    hostile = {
        "infinite loop": "while True:\n    pass\n",
        "memory bomb": "hog = bytearray(4 * 2**30)\n",
        "slow memory bomb": "hog = []\nwhile True:\n    hog.append(' ' * 2**20)\n",
        "fork bomb": "import os\nwhile True:\n    os.fork()\n",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', {str(touched)!r}])\n",
        "write outside": f"open({str(escape)!r}, 'w').write('x')\n",
        "os.open outside": f"import os\nos.close(os.open({str(escape)!r}, os.O_CREAT | os.O_WRONLY))\n",
        "delete outside": f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})\n",
        "socket": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', 9))\n",
        "environment": "import os\nSECRET = os.environ.get('NLPKIT_TEST_SECRET', '')\n",
        "getenv": "import os\nSECRET = os.getenv('HOME')\n",
        "proc environ": "SECRET = open('/proc/self/environ', 'rb').read()\n",
    }
    (tmp_path / "keep.txt").write_text("kept")
    completions = [code + RIGHT for code in hostile.values()] + [RIGHT]
    started = time.monotonic()
    passed, fraction = run_all(completions, timeout=3.0)
    assert dict(zip(hostile, passed)) == dict.fromkeys(hostile, 0.0)
    assert dict(zip(hostile, fraction)) == dict.fromkeys(hostile, 0.0)
    assert passed[-1] == 1.0 and fraction[-1] == 1.0  # the run continues: the good program beside them passes
    assert not escape.exists() and not touched.exists()
    assert (tmp_path / "keep.txt").read_text() == "kept"
    assert time.monotonic() - started < 60  # the loop and the bombs were stopped, not waited out


def test_writing_inside_its_own_directory_is_allowed():
    code = "with open('notes.txt', 'w') as f:\n    f.write('x')\n" + RIGHT
    assert run_all([code])[0] == [1.0]


def test_candidates_run_in_parallel():
    """Two candidates that each sleep 1.5 s finish in well under 3 s when two cores are there."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core")
    sleepers = [f"import time\ntime.sleep(1.5)\n{RIGHT}# {i}" for i in range(2)]
    started = time.monotonic()
    assert run_all(sleepers, timeout=10.0)[0] == [1.0, 1.0]
    assert time.monotonic() - started < 2.9


def test_pass_at_k_matches_hand_computed_values():
    # n=5 samples, c=2 pass: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@5 = 1 (n - c < k)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 1, 10) == 1.0
    # n=8, c=1: pass@4 = 1 - C(7,4)/C(8,4) = 1 - 35/70
    assert pass_at_k(8, 1, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    assert pass_rates([0, 2, 8], 8) == pytest.approx({"pass@1": (0 + 0.25 + 1) / 3, "pass@8": 2 / 3})
