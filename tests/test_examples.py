"""Every shipped example job file validates, so none can rot.

Found by globbing `examples/**/*.yaml`: a new example is checked without touching this file.
An example that names local files (the offline ones: paths relative to the repository root,
into ../shared/datasets and the virtual environment) is loaded in full, its data files' columns
read; it is skipped only where those folders are not beside this checkout. An example that
names hub ids only (model and data from the Hugging Face hub) is validated without its data,
since no hub is reachable here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.spec import load_job, looks_like_local_path, read_job_data, validate_job

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EXAMPLES = sorted(p for pattern in ("*.yaml", "*.yml") for p in (REPO / "examples").rglob(pattern))


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _absent_environment(data: dict) -> str | None:
    """Why an offline example cannot be checked here (../shared or a venv package absent), else None.

    A path into a folder that is present but that lacks the file is not excused: that is a typo.
    """
    for value in _strings(data):
        if value.startswith("../shared/") and not SHARED.is_dir():
            return f"{SHARED} is not beside this checkout"
        parts = Path(value).parts
        if parts[:1] == (".venv",) and len(parts) > 4 and not REPO.joinpath(*parts[:5]).exists():
            return f"{Path(*parts[:5])} is not installed"
    return None


def _local_refs(data: dict) -> list[str]:
    model = data.get("model")
    model = model.get("path") if isinstance(model, dict) else model
    data_section = data.get("data") or {}
    refs = [model, data_section.get("train"), data_section.get("validation")]
    return [r for r in refs if isinstance(r, str) and looks_like_local_path(r)]


def test_examples_exist():
    names = {p.relative_to(REPO / "examples").as_posix() for p in EXAMPLES}
    assert {"ag-news-full.yaml", "mrpc-pairs.yaml", "yelp5-subset.yaml", "imdb-sentiment.yaml",
            "offline/ag-news-minilm.yaml", "offline/sst2-minilm.yaml", "offline/mrpc-minilm.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.relative_to(REPO / "examples").as_posix() for p in EXAMPLES])
def test_example_validates(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)  # offline examples name paths relative to the repository root
    data = read_job_data(path)
    if _local_refs(data):
        reason = _absent_environment(data)
        if reason:
            pytest.skip(reason)
        spec = load_job(path)  # paths exist, columns read from the real files' headers
    else:
        spec = validate_job(data, source=str(path), check_data=False)
    assert spec.name and spec.task
