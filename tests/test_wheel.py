"""The package as a user gets it from PyPI: a wheel, installed into a fresh venv, used from another directory.

The venv reuses the test environment's dependencies (installed from requirements.lock) through a .pth path line, so
the test needs neither a registry nor minutes of installs; nlpkit itself comes only from the wheel: a path line does
not run the test environment's own .pth files, so its editable install of nlpkit stays out of sight."""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import yaml

from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]


def run(*argv, cwd, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_wheel_install_lists_copies_and_trains_a_shipped_recipe_from_another_directory(tmp_path, tiny_bert):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
        ROOT, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("nlpkit-*.whl"))
    shipped = sorted(p.name for p in (ROOT / "src" / "nlpkit" / "recipes").glob("*.yaml"))
    packed = sorted(Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("nlpkit/recipes/"))
    assert len(shipped) >= 8 and set(shipped) <= set(packed)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "lock-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", "-q",
        wheel, cwd=tmp_path)

    elsewhere = tmp_path / "lab"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NLPKIT_DATA_DIR")} | {"OMP_NUM_THREADS": "1"}
    where = run(venv / "bin" / "python", "-c", "import nlpkit; print(nlpkit.__file__)", cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(site))  # the wheel's copy, not the source tree's

    nlpkit = venv / "bin" / "nlpkit"
    listed = json.loads(run(nlpkit, "recipes", "--json", cwd=elsewhere, env=env).stdout)["recipes"]
    assert sorted(f"{name}.yaml" for name in listed) == shipped
    run(nlpkit, "recipes", "--copy", "classify-sst2", cwd=elsewhere, env=env)
    copied = yaml.safe_load((elsewhere / "classify-sst2.yaml").read_text())
    assert copied["data"]["train"] == "sst2"

    out = elsewhere / "run"
    trained = run(nlpkit, "finetune", "classify-sst2.yaml", f"model.name={tiny_bert}",
                  f"data.train={FIXTURES / 'sentiment_train.csv'}", f"data.eval={FIXTURES / 'sentiment_eval.csv'}",
                  "train.max_steps=3", "train.save_strategy='no'", "--output-dir", out, "--json", cwd=elsewhere, env=env)
    assert json.loads(trained.stdout)["eval_accuracy"] is not None
    manifest = json.loads((out / "nlpkit_run.json").read_text())
    assert manifest["config"]["model"]["name"] == str(tiny_bert) and (out / "model.safetensors").is_file()
