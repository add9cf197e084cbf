"""Run the real CLI in-process and hand back exit code, stdout and stderr separately."""

import json
from dataclasses import dataclass

from typer.testing import CliRunner

from nlpkit.cli import app


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def nlpkit(*args) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return Result(result.exit_code, result.stdout, result.stderr)


def write_recipe(path, text: str):
    path.write_text(text)
    return path
