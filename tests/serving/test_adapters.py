"""Many adapters over one base in one process (serving/adapters.py, serving/multiplex.py), without Serve:
each answers exactly as it does loaded alone, switched, evicted, or mixed in one forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapter_exports import build_bottleneck_export, build_lora_export, reference_probs

TEXTS = ["a good film", "a terrible waste of time"]


def _read(export: Path):
    from serving import model_store

    return model_store.read_info(export)[0], model_store.read_json(export, "adapter_config.json")


def _probs(outputs) -> list[list[float]]:
    """Logits per text → softmax, in label order."""
    return torch.tensor(outputs).softmax(-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_stack_switches_lora_and_bottleneck_adapters(tiny_text_model: Path, tmp_path: Path,
                                                             dtype: torch.dtype) -> None:
    """Both adapter kinds, two each over one base: each answers as it does loaded alone, in any order,
    exactly in float32 and within bfloat16's rounding when the replica serves bfloat16 (serve.dtype)."""
    from transformers import AutoTokenizer

    from serving.adapters import AdapterStack
    from serving.pools import pool_key
    from serving.config import ServeSpec
    from serving.handlers import HANDLERS

    texts = TEXTS
    kinds = {
        "lora": [build_lora_export(tiny_text_model, tmp_path / f"l{i}", f"l{i}", 10 + i) for i in range(2)],
        "bottleneck": [build_bottleneck_export(tiny_text_model, tmp_path / f"b{i}", f"b{i}", 20 + i) for i in range(2)],
    }
    for exports in kinds.values():
        stack = AdapterStack(pool_key(*_read(exports[0])), torch.device("cpu"), dtype)
        handlers = {}
        for export in exports:
            stack.attach(export.name, export)
            handlers[export.name] = HANDLERS.get("text-classification")(
                _read(export)[0], ServeSpec(), stack.model, AutoTokenizer.from_pretrained(export), torch.device("cpu"))
        answers = {}
        for export in [*exports, *reversed(exports)]:
            out = stack.run(export.name, export, lambda: handlers[export.name].run_batch([(t, None) for t in texts]))
            probs = _probs(out)
            assert {p.dtype for p in stack.model.parameters()} == {dtype}  # the adapters' tensors too
            tolerance = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 0}
            want = reference_probs(tiny_text_model, export, texts)
            torch.testing.assert_close(torch.tensor(probs), torch.tensor(want), **tolerance)
            answers[export.name] = probs
        first, second = answers.values()
        assert abs(first[0][0] - second[0][0]) > 1e-3, "two adapters answered alike: switching did nothing"
        stack.detach(exports[0].name)
        assert stack.attached() == [exports[1].name]


def test_one_forward_pass_serves_many_lora_adapters_each_through_its_own(tiny_text_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from serving.adapters import AdapterStack
    from serving.pools import pool_key
    from serving.config import ServeSpec
    from serving.handlers import HANDLERS, parse_request
    from serving.multiplex import LoadedAdapter, run_items

    exports = [build_lora_export(tiny_text_model, tmp_path / f"m{i}", f"m{i}", 30 + i) for i in range(3)]
    stack = AdapterStack(pool_key(*_read(exports[0])), torch.device("cpu"))
    loaded = []
    for export in exports:
        stack.attach(export.name, export)
        info = _read(export)[0]
        if export.name == "m2":  # same head size, other label names: answers use this adapter's own
            info = info.model_copy(update={"labels": ["bad", "good"]})
        handler = HANDLERS.get("text-classification")(info, ServeSpec(), stack.routed,
                                                     AutoTokenizer.from_pretrained(export), torch.device("cpu"))
        loaded.append(LoadedAdapter(stack, export.name, export, handler, "text-classification"))
    assert len({a.mix_key for a in loaded}) == 1  # one tokenizer, one max length: they can share a pass
    # Rows alternate adapters, with a text pair among them (run as its own pass); m1 was evicted from the
    # replica's LRU while its rows waited: re-attached for them, detached after.
    stack.detach("m1")
    loaded[1].evicted = True
    rows = [(loaded[i % 3], (f"text number {i}", "and a pair" if i == 4 else None)) for i in range(7)]
    forward_rows: list[int] = []
    model_call = type(stack.routed).__call__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(stack.routed), "__call__",
                      lambda self, *a, **kw: forward_rows.append(len(kw["input_ids"])) or model_call(self, *a, **kw))
        outputs = run_items(stack, rows)
    assert forward_rows == [6, 1]  # texts of three adapters in one pass, the text pair in another
    assert "m1" not in stack.attached()
    loaded[1].evicted = False
    for (adapter, item), output in zip(rows, outputs):
        alone = stack.run(adapter.model_id, adapter.local, lambda: adapter.handler.run_batch([item]))[0]
        assert output == pytest.approx(alone, abs=1e-5)
    request = parse_request(rows[2][0].handler, {"inputs": "x", "parameters": {"top_k": None}})
    assert {p["label"] for p in rows[2][0].handler.format(outputs[2], request)} == {"bad", "good"}
