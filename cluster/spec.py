"""The job file: YAML validated once into frozen, typed models.

Everything downstream of `load_job` receives a `JobSpec`, never a dict. Every
problem in a job file is collected and reported at once, each with its YAML key
path and the offending value. Field descriptions double as the documentation
(`tunefleet docs`, README's job-file reference), so they cannot drift apart.

Relative paths in a job file are resolved against the current working
directory, as a shell command's arguments are; the run directory keeps the
resolved spec (absolute paths) so a resume or a cluster submission sees the same.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from cluster.errors import JobSpecError, Problem  # noqa: F401  (re-exported)
from cluster.model_checks import gguf_problems, model_storage_of
from cluster.scale_spec import DeepSpeedSpec, deepspeed_problems
from cluster.spec_paths import looks_like_local_path, path_problems, resolve_paths  # noqa: F401  (re-exported)
from serving.config import ServeSpec
from training.methods import METHODS
from training.optim import OPTIMIZER_HELP, OptimizerName, optimizer_problems
from training.storage import STORAGE_URI_SCHEMES
from training.tasks import TASKS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
ColumnRef = Union[str, int]


class Strict(BaseModel):
    """Unknown keys are errors, models are immutable after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    path: str = Field(description="Hub id (`bert-base-uncased`), local Hugging Face directory, or such a directory on "
                      "storage (s3://, gs://: each node copies it once into $TUNEFLEET_MODEL_CACHE).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code. Off: only say yes for code you trust."
    )
    gguf_file: str | None = Field(
        None,
        description="A GGUF file (llama.cpp format) inside `path` to load, dequantised to float32; causal-lm only. "
        "Methods: full, or an adapter that merges (lora, ia3): the export is a plain model, since no one else "
        "loads a GGUF base. Slow at every load: convert once to a safetensors directory instead "
        "(benchmarks/prepare_smollm2.py).",
    )
    weights: str | None = Field(
        None,
        description="Image classification, `torchvision://<arch>` models: pretrained weights, a local .pth/.safetensors "
        "file or an http(s) URL (cached by torch.hub); null: torchvision's default weights for the architecture.",
    )
    # A storage URI's folder (s3://, gs://, file://) as a StorageDir, set by validate_job: it travels with the
    # spec to the workers, and each node reads the model from its own copy (training.storage.model_location).
    _storage: Any = PrivateAttr(default=None)


class ColumnsSpec(Strict):
    text: ColumnRef | list[ColumnRef] | None = Field(
        "text", description="Text column name, or 0-based index for headerless files; a list is joined with `data.text_separator`."
    )
    text_pair: ColumnRef | None = Field(None, description="Second text of a sentence pair (MRPC); null for single texts.")
    label: ColumnRef = Field("label", description="Label column: label names or integers.")
    tokens: ColumnRef | None = Field(
        None, description="Token classification: column of word lists (JSONL/hub), or index in CoNLL files; null: `tokens`, CoNLL column 0."
    )
    tags: ColumnRef | None = Field(
        None, description="Token classification: column of tag lists (JSONL/hub), or index in CoNLL files; null: `tags` else `ner_tags`, CoNLL's last column."
    )
    image: ColumnRef | None = Field(
        None, description="Image classification (CSV/JSONL/hub): image paths relative to the file, or a hub Image column; null: `image` else `img`."
    )

    def refs(self) -> list[tuple[str, ColumnRef]]:
        """(key, column) for every column the job names, in a stable order."""
        text = self.text if isinstance(self.text, list) else [self.text]
        out = [(f"text[{i}]" if isinstance(self.text, list) else "text", ref) for i, ref in enumerate(text) if ref is not None]
        if self.text_pair is not None:
            out.append(("text_pair", self.text_pair))
        out.append(("label", self.label))
        return out


class LimitSpec(Strict):
    train: int | None = Field(None, gt=0, description="Seeded random subset of the training rows (shuffle then select).")
    validation: int | None = Field(None, gt=0, description="Seeded random subset of the validation rows.")


class DataSpec(Strict):
    train: str = Field(description="CSV/TSV (header or not), JSONL, parquet file, or a hub dataset id.")
    validation: str | None = Field(
        None, description="Validation file or hub split; null: a seeded split of `train` (`validation_fraction`)."
    )
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="Share of train held out when no validation set is given.")
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "hub", "conll"] = Field(
        "auto", description="File format; auto: from the file extension, else a hub dataset id (token classification: any other local file is conll, one token a line)."
    )
    header: bool | None = Field(
        None, description="CSV/TSV has a header row; null: yes, unless every column is given by index."
    )
    hub_config: str | None = Field(None, description="Hub dataset configuration name (e.g. `mrpc` of `glue`).")
    train_split: str = Field("train", description="Hub split used for training.")
    validation_split: str | None = Field(None, description="Hub split used for validation, e.g. `validation`.")
    columns: ColumnsSpec = Field(default_factory=ColumnsSpec, description="Which columns hold the inputs and label.")
    text_separator: str = Field(" ", description="Joins several text columns into one text.")
    label_names: list[str] | str | None = Field(
        None,
        description="Label names in id order, or a file with one name per line; null: the sorted distinct labels.",
    )
    unknown_labels: Literal["error", "drop"] = Field(
        "error", description="Rows whose label is not in data.label_names: error, or drop them (counted)."
    )
    label_base: int = Field(
        0, ge=0, description="First integer label when labels are integers and names are given (AG News: 1)."
    )
    limit: LimitSpec = Field(default_factory=LimitSpec, description="Seeded subsets, as the tutorials' shuffle().select().")
    max_length: int = Field(128, ge=8, le=65536, description="Tokens per example; longer inputs are truncated.")
    streaming: bool = Field(
        False, description="Stream the training split to the workers through Ray Data instead of sending each "
        "worker all of it: for data larger than a worker's memory. Needs train.max_steps and data.validation; "
        "limit.train takes the first rows; length grouping within a window (docs/scale.md).")
    streaming_window: int = Field(
        50, ge=1, le=10000, description="data.streaming: batches read, shuffled and grouped by length together.")
    lm_format: Literal["auto", "text", "instruction", "chat"] = Field(
        "auto",
        description="causal-lm: text (a .txt file or the text column, packed into blocks of max_length tokens), "
        "instruction (instruction/input/output columns) or chat (a messages column); the loss covers only the "
        "responses of the last two. auto: chat if there is a messages column, instruction if instruction and "
        "output columns, else text.",
    )
    tag_scheme: Literal["auto", "iob1", "iob2", "bioes"] = Field(
        "auto", description="Token classification: entity tag scheme; auto: bioes if E-/S- tags occur, iob1 if an I- tag starts an entity, else iob2. IOB1 trains as IOB2."
    )
    label_all_subtokens: bool = Field(
        False, description="Token classification: every sub-token of a word carries a tag; false: the first only (the rest ignored by the loss)."
    )
    bad_images: Literal["skip", "error"] = Field(
        "skip", description="Image classification: files that are not readable images are skipped (counted and listed) or an error naming them."
    )
    image_size: int | None = Field(
        None, ge=8, le=4096, description="Image classification: square crop fed to a torchvision model; null: from the weights' metadata (224 for ImageNet weights)."
    )
    image_mean: list[float] | None = Field(
        None, min_length=1, max_length=4, description="Image classification: per-channel normalisation mean for torchvision models; null: the weights' own."
    )
    image_std: list[float] | None = Field(
        None, min_length=1, max_length=4, description="Image classification: per-channel normalisation std for torchvision models; null: the weights' own."
    )
    augment: bool = Field(
        True, description="Image classification: random resized crop and horizontal flip on training images; false: "
        "training images get the evaluation preprocessing (resize, centre crop), as method.cache_features needs."
    )


class MethodSpec(Strict):
    name: str = Field("full", description="Which parameters train: " + ", ".join(METHODS.names()) + ".")
    options: dict[str, Any] = Field(default_factory=dict, description="Method options (see the method's own fields).")

    @model_validator(mode="before")
    @classmethod
    def _gather_options(cls, data: Any) -> Any:
        # Method options sit beside `name` in YAML (method: {name: lora, r: 8}); keep them
        # apart here, the method's own options model checks them in JobSpec.
        if isinstance(data, dict) and "options" not in data:
            data = dict(data)
            name = data.pop("name", "full")
            return {"name": name, "options": data}
        return data


class TrainSpec(Strict):
    epochs: int = Field(1, ge=1, description="Passes over the training data (unless max_steps stops sooner).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to stop after; null: run every epoch.")
    batch_size: int = Field(16, gt=0, description="Examples per worker per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    learning_rate: float = Field(2.0e-5, gt=0, le=1, description="Peak AdamW learning rate.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps spent warming the learning rate up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay; never applied to biases and norms.")
    optimizer: OptimizerName = Field("adamw", description=OPTIMIZER_HELP)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null: no clipping.")
    layer_lr_decay: float | None = Field(
        None, gt=0, le=1, description="Discriminative learning rates: each layer down gets lr × this; null: one rate.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp32 on CPU. bf16 on a CPU with "
        "AVX512-BF16 or AMX trains ~2.2x faster (MiniLM, docs/performance.md) at slightly different numerics: "
        "opt in with bf16; fp16 is for GPUs."
    )
    seed: int = Field(42, description="Seeds data order, subsets, splits and initialisation.")
    cpu_dropout: Literal["fast", "torch"] = Field(
        "fast", description="Dropout on CPU workers. fast: the same Bernoulli mask drawn ~6x cheaper than torch's "
        "bernoulli_ (a MiniLM training step 6-8% faster in a plain loop, docs/performance.md; reproducible, but a "
        "different random stream); torch: torch's own, "
        "bit-identical to a plain PyTorch run with the same seed. GPUs always use torch's."
    )
    unread_positions: Literal["skip", "compute"] = Field(
        "skip", description="Sequence classifiers on BERT-family encoders (bert, roberta, xlm-roberta, electra, "
        "camembert): skip: the last layer computes only the first token, the one the classification head reads "
        "(the same logits and gradients; MiniLM's step ~15% shorter, docs/performance.md); compute: every position, "
        "as the model's own forward. Other models always run their own forward."
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length together: less padding, faster.")
    eval_every_steps: int | None = Field(None, gt=0, description="Evaluate and checkpoint every N steps; null: every epoch.")
    log_every_steps: int = Field(10, gt=0, description="Training-loss lines in metrics.jsonl every N steps.")
    metric: str = Field("auto", description="Metric that picks the best checkpoint and stops early; auto: the task's.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without improvement; null: never."
    )
    class_weights: Literal["none", "auto"] | list[float] = Field(
        "none", description="Loss weights per class: auto from label counts (inverse frequency), or a list."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")


class ScaleSpec(Strict):
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: Literal["auto"] | bool = Field("auto", description="auto: one GPU per worker when the cluster has GPUs.")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs each worker reserves (and torch threads); null: the node's CPUs / workers."
    )
    max_failures: int = Field(0, ge=-1, description="Worker failures to recover from the last checkpoint; -1: unlimited.")
    deepspeed: DeepSpeedSpec | None = Field(
        None, description="Train with DeepSpeed ZeRO inside the Ray Train workers ({stage, offload_optimizer, "
        "offload_params} or {config}); null: plain DDP. See docs/scale.md.")


class TrackingSpec(Strict):
    mlflow: bool = Field(True, description="Log the job's parameters, every metric, the report and the export to MLflow.")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else a local store in the run directory (mlflow.db)."
    )
    experiment: str | None = Field(None, description="MLflow experiment; null: the job name.")
    log_export: bool = Field(
        True, description="Upload export/ as MLflow artifacts; off for very large models (the export path is still tagged)."
    )
    tensorboard: bool = Field(True, description="TensorBoard event files in the run directory (tensorboard/).")


class OutputSpec(Strict):
    storage: str = Field("./runs", description="Run directories go under here: a local path, shared volume, s3:// or gs://.")
    keep_checkpoints: int = Field(2, ge=1, description="Best k checkpoints kept by the metric; the rest are deleted.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking: MLflow and TensorBoard.")


class JobSpec(Strict):
    name: str = Field(description="Run directory name and default model name when served.", pattern=NAME_PATTERN)
    task: str = Field(description="What the model predicts: " + ", ".join(TASKS.names()) + ".")
    model: ModelSpec = Field(description="Pretrained model: a hub id or path, or {path, revision, trust_remote_code}.")
    data: DataSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    scale: ScaleSpec = Field(default_factory=ScaleSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)

    @field_validator("model", mode="before")
    @classmethod
    def _model_from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    def method_options(self) -> BaseModel:
        """The method's own options model (validated in `validate_job`)."""
        return METHODS.get(self.method.name).options.model_validate(self.method.options)

    def dump(self) -> dict[str, Any]:
        """The spec as plain YAML-able data (method options inlined, as written)."""
        data = self.model_dump(mode="json")
        data["method"] = {"name": self.method.name, **self.method.options}
        return data


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`train.learning_rate=3e-5` → (["train", "learning_rate"], 3e-5); values are YAML."""
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
            problems.append(Problem(path="--set", message="expected key.path=value", value=item))
            continue
        text = raw.strip()
        if "#" in text and text[0] not in "[{\"'":
            # Text as written: YAML takes `#...` for a comment, so `text_pair=#2 String` (MRPC's column) was null.
            value = text
        else:
            try:
                value = yaml.safe_load(raw) if text else ""
            except yaml.YAMLError:
                value = raw
        parsed.append((key.split("."), value))
    if problems:
        raise JobSpecError(problems, "--set")
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = _deep_copy(data)
    for keys, value in parse_overrides(overrides):
        node = data
        for key in keys[:-1]:
            if key == "model" and isinstance(node.get(key), str):
                node[key] = {"path": node[key]}
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[keys[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def read_job_data(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise JobSpecError([Problem(path="(file)", message=f"no job file at {path}; pass the path of a YAML job file")])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise JobSpecError([Problem(path=f"(yaml {where})", message=f"not valid YAML: {getattr(err, 'problem', err)}")], str(path)) from None
    if not isinstance(data, dict):
        raise JobSpecError([Problem(path="(top level)", message="a job file is a YAML mapping of name, task, model, data, ...", value=type(data).__name__)], str(path))
    return data


def load_job(path: str | Path, overrides: list[str] = (), base_dir: Path | None = None, check_data: bool = True) -> JobSpec:
    """Read, override and validate a job file; raise JobSpecError with every problem."""
    data = apply_overrides(read_job_data(path), list(overrides))
    return validate_job(data, source=str(path), base_dir=base_dir, check_data=check_data)


def validate_job(
    data: dict[str, Any], source: str = "job file", base_dir: Path | None = None, check_data: bool = True
) -> JobSpec:
    """Validate job-file data into a JobSpec; with check_data, also read the data files' headers
    (columns exist) so a job that cannot train fails here, before any cluster time."""
    base = base_dir or Path.cwd()
    problems: list[Problem] = []
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        spec = None
        problems.extend(_problems_from(err, data))
    # Cross-field and path rules run on every section that validated, so one
    # message holds every problem, not only the first layer of them.
    partial = spec if spec is not None else _valid_sections(data)
    problems.extend(_cross_field_problems(partial))
    missing = [Problem(path=k, message=m, value=v) for k, m, v in path_problems(partial, base)]
    problems.extend(missing)
    # A missing model or output path does not stop the data checks: only a data path that is wrong does.
    data_paths_ok = not any(p.path == "data" or p.path.startswith("data.") for p in missing)
    if check_data and data_paths_ok and partial.data is not None and partial.task in TASKS:
        resolved = resolve_paths(spec, base) if spec is not None else partial
        problems.extend(Problem(path=p, message=m, value=v) for p, m, v in TASKS.get(partial.task).check_data(resolved))
    model_storage = None
    if spec is not None and spec.model.path.startswith(STORAGE_URI_SCHEMES):
        model_storage, problem = model_storage_of(spec.model.path, check_data, spec.model.gguf_file)
        problems.extend([problem] if problem else [])
    if problems:
        raise JobSpecError(problems, source)
    spec = resolve_paths(spec, base)
    spec.model._storage = model_storage  # private: the job's YAML and its dump keep the URI
    return spec


def _valid_sections(data: dict[str, Any]) -> SimpleNamespace:
    """Each top-level section validated on its own; None where it is missing or invalid."""
    sections: dict[str, Any] = {}
    for key, field in JobSpec.model_fields.items():
        if key not in data:
            sections[key] = None if field.is_required() else field.get_default(call_default_factory=True)
            continue
        value = {"path": data[key]} if key == "model" and isinstance(data[key], str) else data[key]
        try:
            sections[key] = TypeAdapter(field.annotation).validate_python(value)
        except ValidationError:
            sections[key] = None
    return SimpleNamespace(**sections)


def _problems_from(err: ValidationError, data: dict[str, Any], prefix: tuple = ()) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = tuple(str(p) for p in prefix + tuple(e["loc"]))
        # Union branches repeat a location with a type tag ("str", "int"): keep the key path only.
        loc = tuple(p for p in loc if not re.fullmatch(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|.*\[.*\])", p) or p.isdigit())
        path = _dotted(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            message = "unknown key; check its spelling against `tunefleet docs`"
        elif e["type"] == "missing":
            message = "required key is missing"
        else:
            message = e["msg"][0].lower() + e["msg"][1:]
        value = None if e["type"] in ("missing",) else e.get("input")
        if isinstance(value, dict):
            value = None
        problem = Problem(path=path, message=message, value=value)
        if all(str(p) != str(problem) for p in problems):
            problems.append(problem)
    return problems


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _cross_field_problems(spec: Any) -> list[Problem]:
    problems: list[Problem] = []
    task_known = isinstance(spec.task, str) and spec.task in TASKS
    if isinstance(spec.task, str) and not task_known:
        problems.append(Problem(path="task", message=f"unknown task; known: {', '.join(TASKS.names())}", value=spec.task))
    if spec.method is not None and spec.method.name not in METHODS:
        problems.append(Problem(path="method.name", message=f"unknown method; known: {', '.join(METHODS.names())}", value=spec.method.name))
    elif spec.method is not None:
        method = METHODS.get(spec.method.name)
        try:
            options = method.options.model_validate(spec.method.options)
        except ValidationError as err:
            problems.extend(_problems_from(err, spec.method.options, prefix=("method",)))
        else:
            if method.check_spec is not None:
                problems.extend(Problem(path=p, message=m, value=v) for p, m, v in method.check_spec(spec, options))
        if task_known and spec.task not in method.tasks:
            fitting = [m for m in METHODS.names() if spec.task in METHODS.get(m).tasks]
            problems.append(Problem(
                path="method.name",
                message=f"{spec.method.name} does not fit task {spec.task}; methods for {spec.task}: {', '.join(fitting)}",
                value=spec.method.name,
            ))
    if task_known and spec.data is not None:
        problems.extend(Problem(path=p, message=m, value=v) for p, m, v in TASKS.get(spec.task).check_spec(spec))
        if spec.data.streaming:
            problems.extend(_streaming_problems(spec))
    problems.extend(gguf_problems(spec, task_known))
    # serve: replica and batching bounds are ServeSpec's own validators (serving/config.py).
    train = spec.train
    if train is not None and isinstance(train.class_weights, list) and any(w <= 0 for w in train.class_weights):
        problems.append(Problem(path="train.class_weights", message="every weight must be > 0", value=train.class_weights))
    if spec.scale is not None and spec.method is not None:
        problems.extend(Problem(path=p, message=m, value=v) for p, m, v in deepspeed_problems(spec))
    if train is not None and spec.scale is not None:
        problems.extend(Problem(path=p, message=m, value=v) for p, m, v in optimizer_problems(
            train.optimizer, spec.scale.use_gpu, spec.scale.deepspeed is not None))
    return problems


def _streaming_problems(spec: Any) -> list[Problem]:
    streaming_tasks = [name for name in TASKS.names() if TASKS.get(name).supports_streaming]
    problems = []
    if spec.task not in streaming_tasks:
        problems.append(Problem(path="data.streaming", message=f"task {spec.task} reads its data whole; streaming "
                                f"tasks: {', '.join(streaming_tasks)}", value=True))
    if spec.train is not None and spec.train.max_steps is None:
        problems.append(Problem(path="train.max_steps", message="data.streaming needs a step count: the length of a "
                                "stream is unknown until it is read (the LR schedule needs one)", value=None))
    if spec.data.validation is None:
        problems.append(Problem(path="data.validation", message="data.streaming needs a validation file (holding out "
                                "a fraction of a stream would need a pass over all of it)", value=None))
    return problems
