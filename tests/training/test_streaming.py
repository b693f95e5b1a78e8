"""data.streaming: the training split read and tokenized by Ray Data, batched per worker in whole windows."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.spec import JobSpecError, validate_job

pytestmark = pytest.mark.integration


def _job(model: Path, train: Path, dev: Path, **data) -> dict:
    return {
        "name": "stream", "task": "text-classification", "model": str(model),
        "data": {"train": str(train), "validation": str(dev), "columns": {"text": "sentence", "label": "label"},
                 "max_length": 32, "streaming": True, **data},
        "train": {"max_steps": 10, "batch_size": 8, "seed": 3},
        "scale": {"workers": 1, "use_gpu": False},
    }


def test_streaming_rules_name_what_to_set(tiny_text_model, sentiment_tsv):
    job = _job(tiny_text_model, *sentiment_tsv)
    job["train"] = {"epochs": 1}
    del job["data"]["validation"]
    job["task"] = "token-classification"
    with pytest.raises(JobSpecError) as caught:
        validate_job(job, check_data=False)
    message = str(caught.value)
    assert "train.max_steps: data.streaming needs a step count" in message
    assert "data.validation: data.streaming needs a validation file" in message
    assert "data.streaming: task token-classification reads its data whole; streaming tasks: text-classification" in message


@pytest.fixture(scope="module")
def uneven_tsv(tmp_path_factory) -> tuple[Path, Path]:
    """The generated sentiment sentences padded with 0-20 filler words: lengths to group by."""
    import random

    from testdata import FILLER, sentiment_rows

    rng, directory = random.Random(5), tmp_path_factory.mktemp("uneven")
    paths = []
    for name, n, seed in (("train.tsv", 480, 1), ("dev.tsv", 64, 2)):
        rows = [(text + " " + " ".join(rng.choices(FILLER, k=rng.randint(0, 20))), label)
                for text, label in sentiment_rows(n, seed)]
        (directory / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
        paths.append(directory / name)
    return paths[0], paths[1]


def test_stream_tokenizes_like_the_in_memory_path(local_ray, tiny_text_model, uneven_tsv):
    from training.streaming import stream_epoch
    from training.tasks import TASKS

    task = TASKS.get("text-classification")
    streamed = task.prepare(validate_job(_job(tiny_text_model, *uneven_tsv)))
    whole = task.prepare(validate_job(_job(tiny_text_model, *uneven_tsv, streaming=False)))
    assert streamed.labels == whole.labels and streamed.label_counts == whole.label_counts
    assert streamed.summary()["train_rows"] == whole.train.num_rows == 480
    assert streamed.train.num_rows == 0 and streamed.validation.equals(whole.validation)

    def epoch(epoch: int, skip: int = 0, accumulation: int = 1) -> list[list[dict]]:
        return list(stream_epoch(streamed.train_stream, batch_size=8, accumulation=accumulation, seed=3, epoch=epoch,
                                 group_by_length=True, window=5, length_column="length", skip=skip))

    first = epoch(0)
    # Every row once (480 = 60 full batches), the same token ids as the in-memory table.
    assert len(first) == 60 and all(len(b) == 8 for b in first)
    key = lambda row: (tuple(row["input_ids"]), row["labels"])  # noqa: E731
    assert sorted(key(r) for b in first for r in b) == sorted(key(r) for r in whole.train.to_pylist())
    # Length grouping inside each window of 5 batches: a batch spans far less than the window does.
    spread = [max(r["length"] for r in b) - min(r["length"] for r in b) for b in first]
    assert sum(spread) / len(spread) < 0.5 * (max(r["length"] for b in first for r in b) - min(r["length"] for b in first for r in b))
    # Deterministic: a resume that skips 17 batches gets exactly the rest of the epoch.
    assert epoch(0, skip=17) == first[17:]
    assert epoch(1) != first  # another epoch, another order
    # Accumulation groups are whole: 60 batches in groups of 7 → 56.
    assert len(epoch(0, accumulation=7)) == 56


def test_two_workers_train_on_a_stream(local_ray, tiny_text_model, sentiment_tsv, tmp_path):
    """2 Ray Train workers, each fed its half of the stream: the model learns, the export answers."""
    from transformers import pipeline

    from tests.integration.scale_jobs import fit, records

    job = _job(tiny_text_model, *sentiment_tsv)
    job["train"] = {"max_steps": 40, "batch_size": 8, "learning_rate": 3.0e-3, "warmup_ratio": 0.0, "seed": 7,
                    "scheduler": "constant",
                    "eval_every_steps": 20, "log_every_steps": 5}
    job["scale"] = {"workers": 2, "use_gpu": False}
    job["output"] = {"storage": str(tmp_path / "runs")}
    result = fit(job, "streamed")
    metrics = records(Path(result.run_dir) / "metrics.jsonl")
    assert [r["step"] for r in metrics if r["event"] == "eval"] == [20, 40]
    assert next(r for r in metrics if r["event"] == "start")["world_size"] == 2
    # 480 rows / 2 workers / 8 = 30 batches a worker an epoch: step 40 is in the second epoch.
    assert max(r["epoch"] for r in metrics if r["event"] == "train") == 1
    assert result.metrics["accuracy"] >= 0.9
    assert pipeline("text-classification", model=result.export_dir)("a wonderful film")[0]["label"] in ("positive", "negative")
