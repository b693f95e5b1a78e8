"""Job files: good ones load into a frozen spec, bad ones fail once with every problem, its key path and value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cluster.cli import main
from cluster.spec import JobSpec, JobSpecError, apply_overrides, load_job, parse_overrides, validate_job
from training.methods import METHODS
from training.tasks import TASKS


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    """A job directory: a model folder, a TSV with a header, label names; the CWD is here."""
    (tmp_path / "model").mkdir()
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na fine film\tpositive\na dull film\tnegative\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nquite good\tpositive\n")
    (tmp_path / "labels.txt").write_text("negative\npositive\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def good_job() -> dict:
    return {
        "name": "sst2-tiny",
        "task": "text-classification",
        "model": "./model",
        "data": {"train": "train.tsv", "validation": "dev.tsv", "columns": {"text": "sentence", "label": "label"}},
        "method": {"name": "full"},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 3.0e-5},
        "scale": {"workers": 2, "use_gpu": False},
        "output": {"storage": "./runs"},
        "serve": {"min_replicas": 1, "max_replicas": 2},
    }


def write_job(directory: Path, data: dict, name: str = "job.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(data: dict, **kwargs) -> dict[str, object]:
    """{key path: value} of every problem; fails when the job validates."""
    with pytest.raises(JobSpecError) as raised:
        validate_job(data, **kwargs)
    return {p.path: p.value for p in raised.value.problems}


def message_of(data: dict, **kwargs) -> str:
    with pytest.raises(JobSpecError) as raised:
        validate_job(data, **kwargs)
    return str(raised.value)


# --- good files --------------------------------------------------------------------------------

def test_good_job_loads_into_typed_models(workdir):
    spec = load_job(write_job(workdir, good_job()))
    assert isinstance(spec, JobSpec)
    assert spec.train.epochs == 2 and spec.train.learning_rate == pytest.approx(3e-5)
    assert spec.scale.use_gpu is False and spec.scale.workers == 2
    assert spec.data.columns.text == "sentence" and spec.data.columns.text_pair is None
    assert spec.model.path == str(workdir / "model") and spec.model.trust_remote_code is False
    assert spec.train.scheduler == "linear"  # a default filled in


def test_relative_paths_resolve_against_the_working_directory(workdir):
    job = good_job()
    job["data"]["label_names"] = "labels.txt"
    spec = validate_job(job)
    assert spec.data.train == str(workdir / "train.tsv")
    assert spec.data.validation == str(workdir / "dev.tsv")
    assert spec.data.label_names == str(workdir / "labels.txt")
    assert spec.model.path == str(workdir / "model")
    assert spec.output.storage == str(workdir / "runs")


def test_hub_ids_are_left_alone(workdir):
    job = good_job() | {"model": "bert-base-uncased"}
    job["data"] = {"train": "glue", "hub_config": "mrpc", "validation_split": "validation",
                   "columns": {"text": "sentence1", "text_pair": "sentence2", "label": "label"}}
    spec = validate_job(job, check_data=False)
    assert spec.model.path == "bert-base-uncased" and spec.data.train == "glue"


@pytest.mark.parametrize("task", ["text-classification", "causal-lm"])
def test_an_unreachable_hub_dataset_is_one_problem_not_one_per_split(workdir, monkeypatch, task):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: fails at once (online, each read retries for ~25 s)
    job = good_job() | {"task": task}
    job["data"] = {"train": "tunefleet-test/no-such-dataset", "validation_split": "test",
                   "columns": {"text": "text"} | ({"label": "label"} if task == "text-classification" else {})}
    with pytest.raises(JobSpecError) as caught:
        validate_job(job)
    [problem] = caught.value.problems
    assert problem.path == "data.train" and problem.message.startswith("cannot read tunefleet-test/no-such-dataset")


def test_a_model_that_cannot_be_loaded_is_one_problem_at_model(workdir, monkeypatch):
    """What `tunefleet train` reports (exit 2) instead of a traceback, before any worker starts."""
    from training.data.tables import DataError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepare = TASKS.get("text-classification").prepare
    for model, why in (("./model", "the folder has no config.json: give a folder that save_pretrained() wrote"),
                       ("tunefleet-test/no-such-model", "")):
        spec = validate_job(good_job() | {"model": model})
        with pytest.raises(DataError) as caught:
            prepare(spec)
        [(key, message, _)] = caught.value.problems
        assert key == "model" and message.startswith(f"cannot load {spec.model.path}: {why}"), message


def test_a_model_named_by_a_storage_uri_is_read_from_this_nodes_copy(workdir, tiny_text_model, monkeypatch):
    """`model: s3://...` (here file://, the same code path without a server) was passed to from_pretrained as is."""
    import pickle

    from training.storage import model_location

    monkeypatch.setenv("TUNEFLEET_MODEL_CACHE", str(workdir / "cache"))
    uri = tiny_text_model.as_uri()
    spec = validate_job(good_job() | {"model": uri})
    assert spec.model.path == uri and spec.model.model_dump()["path"] == uri  # job.yaml keeps the URI
    assert model_location(spec.model) == str(tiny_text_model)  # file:// needs no copy
    assert model_location(pickle.loads(pickle.dumps(spec)).model) == str(tiny_text_model)  # as the workers get it
    model = TASKS.get("text-classification").build_model(spec, ["negative", "positive"])
    assert model.config.hidden_size == 32
    assert problems_of(good_job() | {"model": "s3://"}) == {"model": "s3://"}  # names no bucket
    assert "no config.json in file:///nowhere" in message_of(good_job() | {"model": "file:///nowhere"})
    assert validate_job(good_job() | {"model": "file:///nowhere"}, check_data=False).model.path == "file:///nowhere"


def test_a_storage_uri_folder_with_a_gguf_file_needs_no_config_json(workdir):
    """A GGUF folder has no config.json: the check looks for model.gguf_file there instead (it refused it)."""
    (workdir / "gguf").mkdir()
    (workdir / "gguf" / "smollm2.Q8_0.gguf").write_bytes(b"GGUF")
    job = good_job() | {"task": "causal-lm", "data": {"train": "train.tsv", "columns": {"text": "sentence"}}}
    uri = (workdir / "gguf").as_uri()
    spec = validate_job(job | {"model": {"path": uri, "gguf_file": "smollm2.Q8_0.gguf"}})
    assert spec.model.path == uri and spec.model.gguf_file == "smollm2.Q8_0.gguf"
    message = message_of(job | {"model": {"path": uri, "gguf_file": "other.gguf"}})
    assert f"no other.gguf (model.gguf_file) in {uri}" in message, message
    assert problems_of(good_job() | {"model": {"path": "./model", "gguf_file": "m.gguf"}}) == {"model.gguf_file": "m.gguf"}


def test_spec_is_frozen(workdir):
    spec = validate_job(good_job())
    with pytest.raises(ValidationError):
        spec.train.epochs = 5
    with pytest.raises(ValidationError):
        spec.name = "other"


def test_dump_round_trips(workdir):
    job = good_job()
    job["data"]["limit"] = {"train": 1}
    spec = validate_job(job)
    dumped = spec.dump()
    yaml.safe_dump(dumped)  # plain YAML-able data
    assert validate_job(yaml.safe_load(yaml.safe_dump(dumped))) == spec


# --- bad files: each kind of problem -------------------------------------------------------------

def test_unknown_keys_top_level_and_nested(workdir):
    job = good_job() | {"epochs": 3}
    job["data"]["colums"] = {"text": "sentence"}
    job["train"]["learning_rat"] = 1e-4
    found = problems_of(job)
    assert set(found) >= {"epochs", "data.colums", "train.learning_rat"}
    assert found["epochs"] == 3 and found["train.learning_rat"] == 1e-4
    assert "unknown key" in message_of(job)


def test_wrong_types_name_path_and_value(workdir):
    job = good_job()
    job["train"]["epochs"] = "three"
    job["scale"]["workers"] = [2]
    job["serve"]["max_batch_size"] = "big"
    found = problems_of(job)
    assert found["train.epochs"] == "three"
    assert found["scale.workers"] == [2]
    assert found["serve.max_batch_size"] == "big"


def test_missing_required_keys(workdir):
    job = good_job()
    del job["name"]
    del job["data"]["train"]
    message = message_of(job)
    assert "name: required key is missing" in message
    assert "data.train: required key is missing" in message


def test_bad_paths_name_the_absolute_path(workdir):
    job = good_job()
    job["data"]["train"] = "data/missing.tsv"
    job["model"] = "./no-model"
    found = problems_of(job)
    assert found["data.train"] == "data/missing.tsv" and found["model"] == "./no-model"
    message = message_of(job)
    assert f"no such file or directory: {workdir / 'data' / 'missing.tsv'}" in message


@pytest.mark.parametrize("section, values, path, shown", [
    ("train", {"epochs": 0}, "train.epochs", 0),
    ("train", {"learning_rate": -1e-5}, "train.learning_rate", -1e-5),
    ("train", {"warmup_ratio": 1.5}, "train.warmup_ratio", 1.5),
    ("scale", {"workers": 0}, "scale.workers", 0),
    ("data", {"max_length": 2}, "data.max_length", 2),
])
def test_impossible_values(workdir, section, values, path, shown):
    job = good_job()
    job[section].update(values)
    assert problems_of(job) == {path: shown}


def test_cross_field_serve_rules_say_both_fields(workdir):
    job = good_job()
    job["serve"] = {"min_replicas": 3, "max_replicas": 1}
    [problem] = pytest.raises(JobSpecError, validate_job, job).value.problems
    assert problem.path.startswith("serve") and "min_replicas (3)" in str(problem) and "max_replicas (1)" in str(problem)

    job["serve"] = {"max_ongoing_requests": 8, "max_batch_size": 32}
    [problem] = pytest.raises(JobSpecError, validate_job, job).value.problems
    assert problem.path.startswith("serve")
    assert "max_ongoing_requests (8)" in str(problem) and "max_batch_size (32)" in str(problem)


def test_unknown_task_and_method_list_the_known_names(workdir):
    job = good_job() | {"task": "text-clasification", "method": {"name": "lorra"}}
    found = problems_of(job)
    assert found == {"task": "text-clasification", "method.name": "lorra"}
    message = message_of(job)
    assert "known: " + ", ".join(TASKS.names()) in message
    assert "known: " + ", ".join(METHODS.names()) in message


def test_unknown_method_option(workdir):
    job = good_job()
    job["method"] = {"name": "full", "rank": 8}
    assert problems_of(job) == {"method.rank": 8}


def test_method_that_does_not_fit_the_task(workdir):
    pairs = [(m, t) for m in METHODS.names() for t in TASKS.names() if t not in METHODS.get(m).tasks]
    if not pairs:
        pytest.skip("every registered method fits every registered task")
    method, task = pairs[0]
    job = good_job() | {"task": task, "method": {"name": method}}
    with pytest.raises(JobSpecError) as raised:
        validate_job(job, check_data=False)
    [problem] = [p for p in raised.value.problems if p.path == "method.name"]
    assert problem.value == method and f"does not fit task {task}" in problem.message


def test_missing_column_lists_the_columns_that_exist(workdir):
    job = good_job()
    job["data"]["columns"] = {"text": "sentense", "label": "label"}
    found = problems_of(job)
    assert found == {"data.columns.text": "sentense"}
    assert "use one of sentence, label" in message_of(job)
    # check_data=False skips reading the files.
    validate_job(job, check_data=False)


def test_a_missing_model_does_not_hide_a_missing_column(workdir):
    job = good_job() | {"model": "./no-model"}
    job["data"]["columns"] = {"text": "sentense", "label": "label"}
    assert set(problems_of(job)) == {"model", "data.columns.text"}


def test_named_columns_on_a_headerless_csv_suggest_indices(workdir):
    """AG News has no header row: its first row read as names is data, and the hint says how to index."""
    (workdir / "news.csv").write_text('"3","Wall St. Bears Claw Back Into the Black (Reuters)","Reuters - Short-sellers, '
                                      'Wall Street\'s dwindling band of ultra-cynics, are seeing green again."\n'
                                      '"4","A title","A description"\n')
    job = good_job()
    job["data"] = {"train": "news.csv", "columns": {"text": "text", "label": "label"}}
    message = message_of(job)
    assert "news.csv has no column 'text'" in message and "0-based indices (0 to 2)" in message
    assert "Wall St. Bears Claw Back Into the Black…" in message  # long names cut short
    # A real header gets no such advice.
    job["data"] = {"train": "train.tsv", "columns": {"text": "sentense"}}
    assert "0-based" not in message_of(job)


def test_every_problem_in_one_error(workdir):
    job = good_job() | {"task": "text-clasification", "extra": True}
    del job["name"]
    job["data"]["train"] = "missing.csv"
    job["train"].update(epochs=0, learning_rate=-1, optimiser="sgd")
    job["scale"]["workers"] = "two"
    job["serve"] = {"min_replicas": 3, "max_replicas": 1}
    job["method"] = {"name": "lorra"}
    with pytest.raises(JobSpecError) as raised:
        validate_job(job)
    paths = [p.path for p in raised.value.problems]
    for expected in ("name", "task", "extra", "data.train", "train.epochs", "train.learning_rate",
                     "train.optimiser", "scale.workers", "method.name"):
        assert expected in paths, f"{expected} not reported: {paths}"
    assert any(p.startswith("serve") for p in paths)
    message = str(raised.value)
    assert message.startswith(f"job file: {len(paths)} problems")
    assert len(set(paths)) == len(paths), "a problem reported twice"


def test_yaml_syntax_and_shape_errors(workdir):
    path = workdir / "broken.yaml"
    path.write_text("name: x\ntrain: {epochs: 2\n")
    with pytest.raises(JobSpecError, match=r"line \d+, column \d+"):
        load_job(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(JobSpecError, match="YAML mapping"):
        load_job(path)
    with pytest.raises(JobSpecError, match="no job file"):
        load_job(workdir / "nope.yaml")


# --- --set overrides ------------------------------------------------------------------------------

def test_overrides_are_nested_and_yaml_typed(workdir):
    path = write_job(workdir, good_job())
    spec = load_job(path, [
        "train.epochs=3",
        "train.learning_rate=1.0e-4",
        "scale.use_gpu=auto",
        "data.limit.train=1",  # creates the nested section
        "data.columns.text=[sentence, sentence]",
        "train.max_grad_norm=null",
    ])
    assert spec.train.epochs == 3 and spec.train.learning_rate == pytest.approx(1e-4)
    assert spec.scale.use_gpu == "auto"
    assert spec.data.limit.train == 1
    assert spec.data.columns.text == ["sentence", "sentence"]
    assert spec.train.max_grad_norm is None


def test_an_override_with_a_hash_is_the_text_written_not_a_yaml_comment():
    """MRPC's columns are `#1 String` and `#2 String`: as YAML, `#2 String` is a comment, and the pair column
    silently became null (a pair task trained on single texts)."""
    assert [value for _, value in parse_overrides([
        "data.columns.text_pair=#2 String", "data.columns.text= #1 String ", "name=a#b", "x.y=['#1 String', b]",
        "x.z='#3'",
    ])] == ["#2 String", "#1 String", "a#b", ["#1 String", "b"], "#3"]


def test_override_into_a_model_given_as_a_string(workdir):
    data = apply_overrides(good_job(), ["model.revision=v1.0"])
    assert data["model"] == {"path": "./model", "revision": "v1.0"}
    assert validate_job(data).model.revision == "v1.0"
    assert good_job()["model"] == "./model"  # the input is not modified


def test_overrides_are_validated_like_the_file(workdir):
    path = write_job(workdir, good_job())
    with pytest.raises(JobSpecError) as raised:
        load_job(path, ["train.epochs=0", "train.epoch=3"])
    assert {p.path: p.value for p in raised.value.problems} == {"train.epochs": 0, "train.epoch": 3}


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train..epochs=3", "train epochs=3"])
def test_malformed_override(workdir, bad):
    path = write_job(workdir, good_job())
    with pytest.raises(JobSpecError) as raised:
        load_job(path, [bad])
    [problem] = raised.value.problems
    assert problem.path == "--set" and problem.value == bad and "key.path=value" in problem.message


# --- the CLI ------------------------------------------------------------------------------------------

def test_validate_command_ok(workdir, capsys):
    path = write_job(workdir, good_job())
    assert main(["validate", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_validate_command_exit_2_with_every_problem_on_stderr(workdir, capsys):
    job = good_job()
    job["train"]["epochs"] = 0
    job["data"]["columns"]["label"] = "sentiment"
    path = write_job(workdir, job)
    assert main(["validate", str(path), "--set", "scale.workers=-1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    # The missing column is reported for each file that lacks it.
    assert captured.err.startswith(f"error: {path}: 4 problems")
    for line in ("train.epochs: input should be greater than or equal to 1 (got 0)",
                 "scale.workers: input should be greater than or equal to 1 (got -1)",
                 "data.columns.label: train.tsv has no column 'sentiment'; use one of sentence, label",
                 "data.columns.label: dev.tsv has no column 'sentiment'"):
        assert line in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.integration
def test_train_command_with_a_bad_job_exits_2_with_the_same_message_and_leaves_nothing(workdir):
    """`tunefleet train` validates the job while its local Ray starts: a bad job still gets validate's one
    message and exit 2, no traceback, no run directory, and the command ends (its Ray stops with it)."""
    import os
    import subprocess
    import sys

    job = good_job()
    job["train"]["epochs"] = 0
    job["output"] = {"storage": str(workdir / "runs")}
    path = write_job(workdir, job)
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(path)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "TUNEFLEET_NO_PROGRESS": "1"})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"error: {path}: 1 problem" in done.stderr
    assert "train.epochs: input should be greater than or equal to 1 (got 0)" in done.stderr
    assert "Traceback" not in done.stderr and not (workdir / "runs").exists()


def test_resuming_a_run_with_another_task_or_method_is_refused_before_any_worker(workdir):
    """A run's checkpoints hold its method's weights: resumed as another method they cannot load (that failed
    in the workers with a traceback). Steps, learning rate and the model's path may change."""
    from cluster.commands.job import _refuse_a_changed_resume
    from training.storage import StorageDir

    began = validate_job(good_job())
    storage = StorageDir.local(workdir / "runs")
    run = workdir / "runs" / began.name / "r1"
    (run / "checkpoints" / "checkpoint_1" / "rank_00000").mkdir(parents=True)
    for name in ("trainer_state.pt", "model.safetensors"):
        (run / "checkpoints" / "checkpoint_1" / "rank_00000" / name).write_bytes(b"x")
    (run / "checkpoints" / "checkpoint_1" / "manifest.json").write_text('{"shards": ["rank_00000"], "step": 5}')
    (run / "job.yaml").write_text(yaml.safe_dump(began.dump(), sort_keys=False))

    longer = good_job()
    longer["train"] |= {"max_steps": 50, "learning_rate": 1.0e-4}
    _refuse_a_changed_resume(validate_job(longer), storage, "r1", "job.yaml")  # no error
    with pytest.raises(JobSpecError) as caught:
        _refuse_a_changed_resume(validate_job(good_job() | {"method": {"name": "lora"}}), storage, "r1", "job.yaml")
    [problem] = caught.value.problems
    assert problem.path == "method" and problem.value == "lora"
    assert problem.message.startswith("run r1 has checkpoints of method 'full', and a run resumes with what it began")
    (run / "checkpoints" / "checkpoint_1" / "manifest.json").unlink()  # no checkpoint yet: nothing to load, no rule
    _refuse_a_changed_resume(validate_job(good_job() | {"method": {"name": "lora"}}), storage, "r1", "job.yaml")
