"""Causal-LM data: packing into blocks, response-only labels for instruction and chat data, the shifted loss.

Tokenizer: a small byte-level BPE trained in the fixture (tests/testdata.py), GPT-2's kind:
no BOS added, <|endoftext|> as EOS, no chat template of its own.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from cluster.spec import JobSpecError, validate_job
from testdata import build_tiny_lm_tokenizer, lm_sentences, shared_file
from training.data.lm import check_lm_data, prepare_lm, sample_prompts
from training.data.prompts import FALLBACK_CHAT_TEMPLATE, prepare_tokenizer
from training.data.tables import DataError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return prepare_tokenizer(build_tiny_lm_tokenizer())


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = build_tiny_lm_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return prepare_tokenizer(tok)


def _spec(tmp_path, train, **data):
    return validate_job({"name": "lm", "task": "causal-lm", "model": str(tmp_path),
                         "data": {"train": str(train), **data}, "train": {"seed": 3}}, check_data=False)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _targets(tok, row) -> str:
    """The text of the tokens the loss trains on (labels != -100, past the first position)."""
    return tok.decode([t for t in row["labels"][1:] if t != -100])


def test_text_file_packs_paragraphs_into_full_blocks(tmp_path, tokenizer):
    paragraphs = [" ".join(lm_sentences(6, seed=i)) for i in range(40)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs))
    spec = _spec(tmp_path, corpus, max_length=32, validation_fraction=0.25)
    train, validation = prepare_lm(spec, tokenizer)

    # The corpus as one token stream: each paragraph with its blank line, in file order.
    stream = [t for p in paragraphs for t in tokenizer(p + "\n\n", add_special_tokens=False)["input_ids"]]
    expected = [stream[i:i + 32] for i in range(0, len(stream) // 32 * 32, 32)]  # the short tail dropped
    blocks = train.column("input_ids").to_pylist() + validation.column("input_ids").to_pylist()
    assert sorted(blocks) == sorted(expected)
    assert set(train.column("length").to_pylist()) == {32}
    assert "labels" not in train.column_names  # every token is a target
    assert 0.15 < validation.num_rows / len(blocks) < 0.35  # the seeded held-out share
    again = prepare_lm(spec, tokenizer)[1].column("input_ids").to_pylist()
    assert again == validation.column("input_ids").to_pylist()  # seeded: the same split every time


def test_text_column_puts_eos_between_documents(tmp_path, tokenizer):
    docs = [" ".join(lm_sentences(3, seed=i)) for i in range(60)]
    train = _write_jsonl(tmp_path / "docs.jsonl", [{"body": d} for d in docs])
    spec = _spec(tmp_path, train, max_length=16, columns={"text": "body"}, validation_fraction=0.1)
    tables = prepare_lm(spec, tokenizer)
    tokens = [t for table in tables for b in table.column("input_ids").to_pylist() for t in b]
    eos = tokenizer.eos_token_id
    assert tokens.count(eos) >= len(docs) - 3  # one after each document (a tail may fall off)
    assert check_lm_data(_spec(tmp_path, train, columns={"text": "text"}))[0][0] == "data.columns.text"


def test_instruction_rows_train_on_the_response_only(tmp_path, tokenizer):
    rows = [{"instruction": "Finish the sentence.", "input": s.split(" ", 2)[0], "output": s} for s in lm_sentences(30)]
    rows[0]["input"] = ""
    train = _write_jsonl(tmp_path / "instr.jsonl", rows)
    spec = _spec(tmp_path, train, max_length=96)
    assert check_lm_data(spec) == []
    train_table, validation_table = prepare_lm(spec, tokenizer)
    encoded = train_table.to_pylist() + validation_table.to_pylist()
    assert len(encoded) == 30
    outputs = {r["output"] for r in rows}
    for row in encoded:
        prompt = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l == -100])
        assert "### Response:" in prompt and "Below is an instruction" in prompt  # Alpaca prompt, masked
        target = _targets(tokenizer, row)
        assert target.endswith("<|endoftext|>") and target.removesuffix("<|endoftext|>").strip() in outputs
    no_input = [r for r in encoded if "### Input:" not in tokenizer.decode(r["input_ids"])]
    assert len(no_input) == 1  # the row with an empty input gets the prompt without an input section
    prompts = sample_prompts(spec, tokenizer, n=2)
    assert len(prompts) == 2 and all(p.endswith("### Response:\n") for p in prompts)


def test_chat_rows_train_on_every_assistant_turn(tmp_path, chat_tokenizer):
    conversations = [
        {"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"Where did {s.split(' ')[1]} go?"},
            {"role": "assistant", "content": s},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": [{"type": "text", "text": "it slept."}]},  # content parts
        ]}
        for s in lm_sentences(20)
    ]
    train = _write_jsonl(tmp_path / "chat.jsonl", conversations)
    spec = _spec(tmp_path, train, max_length=120)
    table, validation = prepare_lm(spec, chat_tokenizer)
    answers = {c["messages"][2]["content"] for c in conversations}
    for row in table.to_pylist():
        text = chat_tokenizer.decode(row["input_ids"])
        target = _targets(chat_tokenizer, row)
        assert "Answer briefly." in text and "Where did" in text  # system and user turns are in the input ...
        assert "Answer briefly." not in target and "Where did" not in target and "And then?" not in target  # ... not targets
        first, second = target.split("<|im_end|>")[:2]
        assert first in answers and second.strip() == "it slept."  # both assistant turns, each with its end tag
        assert target.count("<|im_end|>") == 2 and "assistant" not in target  # the role header is prompt
    assert validation.num_rows == 2


def test_truncation_drops_examples_without_a_response(tmp_path, tokenizer):
    long_prompt = " ".join(lm_sentences(40))
    rows = [{"instruction": long_prompt, "output": "the end."}] * 5 + [{"instruction": "hi", "output": "the cat."}] * 20
    spec = _spec(tmp_path, _write_jsonl(tmp_path / "long.jsonl", rows), max_length=80, validation_fraction=0.2)
    train, validation = prepare_lm(spec, tokenizer)
    assert train.num_rows + validation.num_rows == 20
    assert max(train.column("length").to_pylist()) <= 80
    only_long = _spec(tmp_path, _write_jsonl(tmp_path / "only_long.jsonl", rows[:5]), max_length=80)
    with pytest.raises(DataError, match="no examples with a response token"):
        prepare_lm(only_long, tokenizer)


def test_format_detection_and_problems(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "answer": "y"}])
    problems = check_lm_data(_spec(tmp_path, bad))
    assert problems and "no column 'text'" in problems[0][1] and "prompt, answer" in problems[0][1]
    forced = check_lm_data(_spec(tmp_path, bad, lm_format="chat"))
    assert forced[0][0] == "data.lm_format" and "'messages'" in forced[0][1]
    with pytest.raises(JobSpecError, match="train.class_weights"):
        validate_job({"name": "lm", "task": "causal-lm", "model": str(tmp_path), "data": {"train": str(bad)},
                      "train": {"class_weights": "auto"}}, check_data=False)


def test_collator_and_shifted_loss_match_the_model(tmp_path, tokenizer, tiny_causal_lm):
    from transformers import AutoModelForCausalLM

    from training.tasks import TASKS

    task = TASKS.get("causal-lm")
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE and tokenizer.pad_token == tokenizer.eos_token
    rows = [{"instruction": "Say it.", "output": s} for s in lm_sentences(12)]
    spec = _spec(tmp_path, _write_jsonl(tmp_path / "i.jsonl", rows), max_length=64)
    table, _ = prepare_lm(spec, tokenizer)
    batch = task.build_collator(tokenizer, True)(table.to_pylist()[:4])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding never trains
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
        reference = model(**batch, labels=labels).loss  # Hugging Face's own shifted loss
    loss = task.build_loss(None, 0.0, "cpu")(logits, labels)
    assert torch.allclose(loss, reference, atol=1e-5)
    counts, _ = task.eval_outputs(logits, labels)
    assert sum(counts) == int((labels != -100).sum())
    metrics = task.compute_metrics(counts, [], [], loss.item())
    assert metrics["perplexity"] == pytest.approx(math.exp(loss.item())) and task.greater_is_better is False


def test_tiny_shakespeare_packs_with_a_held_out_split(tmp_path, tokenizer):
    corpus = shared_file("tinyshakespeare", "input.txt")
    spec = _spec(tmp_path, corpus, max_length=128, limit={"validation": 50})
    train, validation = prepare_lm(spec, tokenizer)
    assert validation.num_rows == 50 and train.num_rows > 1000
    first = tokenizer.decode(train.column("input_ids")[0].as_py())
    assert len(first) > 100
