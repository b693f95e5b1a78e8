"""Causal language modelling: next-token prediction on packed text, instructions or chats.

The loss is the shifted cross-entropy of Hugging Face's causal LMs (position t
predicts token t+1; labels of -100 are ignored, so prompts and padding never
train). Evaluation reports perplexity = exp(mean validation loss per target
token), lower is better. The report adds greedy sample generations from the
exported model, loaded through `transformers.pipeline("text-generation")`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.data.lm import check_lm_data, prepare_lm, sample_prompts
from training.data.prompts import prepare_tokenizer
from training.storage import model_location
from training.tasks.base import PreparedData, TaskDefinition, reads_the_model
from training.tasks.registry import TASKS

NAME = "causal-lm"
SAMPLES_FILE = "samples.md"
SAMPLE_NEW_TOKENS = 32


def _check_spec(spec: Any) -> list[tuple[str, str, Any]]:
    problems = []
    train, data = spec.train, spec.data
    if train is not None and train.class_weights != "none":
        problems.append(("train.class_weights", "causal-lm predicts tokens, not classes; leave it at none",
                         train.class_weights))
    if isinstance(data.columns.text, list) and len(data.columns.text) != 1:
        problems.append(("data.columns.text", "causal-lm reads one text column", data.columns.text))
    return problems


@reads_the_model
def _build_processor(spec: Any):
    from transformers import AutoTokenizer

    model = spec.model
    tokenizer = AutoTokenizer.from_pretrained(model_location(model), revision=model.revision, gguf_file=model.gguf_file,
                                              trust_remote_code=model.trust_remote_code)
    return prepare_tokenizer(tokenizer)


def _build_model(spec: Any, labels: list[str], **load_kwargs):
    from transformers import AutoModelForCausalLM

    model_spec = spec.model
    if model_spec.gguf_file:
        from training.gguf import load_gguf_causal_lm

        model = load_gguf_causal_lm(model_location(model_spec), model_spec.gguf_file, revision=model_spec.revision,
                                    trust_remote_code=model_spec.trust_remote_code)
    else:
        # fp32 master weights (autocast does mixed precision); hub checkpoints often ship bf16.
        load_kwargs.setdefault("dtype", torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_location(model_spec), revision=model_spec.revision,
                                                     trust_remote_code=model_spec.trust_remote_code, **load_kwargs)
    generation = model.generation_config
    if generation is not None and generation.pad_token_id is None and generation.eos_token_id is not None:
        eos = generation.eos_token_id
        generation.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def _prepare(spec: Any) -> PreparedData:
    train, validation = prepare_lm(spec, _build_processor(spec))
    return PreparedData(train=train, validation=validation, labels=[])


def _build_collator(tokenizer, training: bool):
    pad = tokenizer.pad_token_id

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            ids = row["input_ids"]
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention_mask[i, :len(ids)] = 1
            labels[i, :len(ids)] = torch.tensor(row.get("labels") or ids)
        # Nothing predicts the first token: ignoring it changes no loss and makes the loop's
        # target count (labels != -100) the shifted loss's exact denominator.
        labels[:, 0] = -100
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


def _build_loss(weights, label_smoothing: float, device):
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Prompt tuning (PEFT) prepends its virtual tokens' logits: they predict no token of the input.
        logits = logits[:, logits.shape[1] - labels.shape[1]:, :]
        shifted_logits, shifted_labels = logits[:, :-1, :], labels[:, 1:]
        if not (shifted_labels != -100).any():  # no target in this batch: a zero loss, not NaN
            return logits.sum() * 0.0
        return F.cross_entropy(shifted_logits.reshape(-1, logits.shape[-1]).float(), shifted_labels.reshape(-1),
                               ignore_index=-100, label_smoothing=label_smoothing)

    return loss


def _eval_outputs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list, list]:
    """Target tokens per example (perplexity comes from the loss; nothing else is kept per example)."""
    return (labels[:, 1:] != -100).sum(dim=1).tolist(), []


def _compute_metrics(predictions, references, labels, eval_loss: float) -> dict[str, Any]:
    return {"perplexity": math.exp(eval_loss) if eval_loss < 700 else float("inf"), "eval_tokens": int(sum(predictions))}


def _report_extras(spec: Any, export_dir: Path, report_dir: Path, manifest: dict) -> dict[str, Any]:
    """Greedy generations for a few prompts from the data, by the export loaded as a user would."""
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(export_dir), device=0 if torch.cuda.is_available() else "cpu")
    samples = []
    for prompt in sample_prompts(spec, generator.tokenizer, n=3):
        out = generator(prompt, max_new_tokens=SAMPLE_NEW_TOKENS, do_sample=False, return_full_text=False)
        samples.append({"prompt": prompt, "completion": out[0]["generated_text"]})
    lines = [f"# Sample generations (greedy, {SAMPLE_NEW_TOKENS} new tokens)\n"]
    for i, sample in enumerate(samples, 1):
        lines += [f"## {i}\n", "Prompt:\n", "```", sample["prompt"], "```", "Completion:\n", "```", sample["completion"], "```\n"]
    (Path(report_dir) / SAMPLES_FILE).write_text("\n".join(lines))
    return {"samples": samples}


TASKS.register(NAME, TaskDefinition(
    name=NAME,
    pipeline_tag="text-generation",
    default_metric="perplexity",
    greater_is_better=False,
    check_spec=_check_spec,
    check_data=check_lm_data,
    prepare=_prepare,
    build_model=_build_model,
    build_processor=_build_processor,
    build_collator=_build_collator,
    compute_metrics=_compute_metrics,
    build_loss=_build_loss,
    eval_outputs=_eval_outputs,
    report_extras=_report_extras,
))
