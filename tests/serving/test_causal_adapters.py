"""LoRA adapters of a causal LM multiplexed over one base: OpenAI routes (plain and streamed) and /predict,
each adapter answering as the same adapter merged into a full model does, in-process."""

from __future__ import annotations

import json
import time
import shutil
import socket
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

PROMPT = "the dog"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora_lm_export(base: Path, export: Path, name: str, seed: int) -> tuple[Path, Path]:
    """(adapter export, the same adapter merged into a full export) over the tiny Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.data.prompts import prepare_tokenizer
    from training.layout import ExportInfo, write_export_info

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(base))  # as training exports it
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    write_export_info(export, ExportInfo(name=name, task="causal-lm", base_model=str(base), method="lora",
                                         adapter=True))
    merged = export.parent / f"{name}-merged"
    model.merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    write_export_info(merged, ExportInfo(name=name, task="causal-lm", base_model=str(base), method="full"))
    return export, merged


def _reference(merged: Path, route: str, body: dict) -> str:
    """What the merged model answers in-process, through the same handler code."""
    from serving.handlers import load_handler
    from serving.openai_compat import CHAT, ChatCompletionRequest, CompletionRequest

    handler = load_handler(merged)
    request = (ChatCompletionRequest if route == CHAT else CompletionRequest).model_validate(body)
    outputs = handler.run_batch(handler.openai_prepare(route, request))
    answer = handler.openai_format(route, request, outputs)
    choice = answer["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_causal_lm_adapters_answer_on_openai_routes(local_ray, tiny_causal_lm: Path, tmp_path: Path) -> None:
    from serving import ServeSpec, start_server
    from serving.openai_compat import COMPLETIONS

    exports = {name: _lora_lm_export(tiny_causal_lm, tmp_path / name, name, seed)
               for name, seed in (("lm-a", 1), ("lm-b", 2))}
    settings = ServeSpec(min_replicas=1, max_replicas=1, num_cpus=0.5, max_batch_size=4, max_ongoing_requests=8,
                         graceful_shutdown_timeout_s=2)
    server = start_server([exports["lm-a"][0], exports["lm-b"][0]], port=_free_port(), settings=settings)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            assert {m["name"] for m in client.get("/v1/models").json()["models"]} == {"lm-a", "lm-b"}
            texts = {}
            for name, (_, merged) in exports.items():
                body = {"model": name, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
                answer = client.post("/v1/completions", json=body)
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"] == name
                texts[name] = answer.json()["choices"][0]["text"]
                assert texts[name] == _reference(merged, COMPLETIONS, body), name

                streamed = client.post("/v1/completions", json={**body, "stream": True})
                assert streamed.status_code == 200, streamed.text
                events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                pieces = [json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"]]
                assert "".join(pieces) == texts[name], name

                predicted = client.post(f"/v1/models/{name}/predict",
                                        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6}})
                assert predicted.status_code == 200, predicted.text
                # the adapter's own URL, as a TGI endpoint's: the URL names the model, not the body
                own = client.post(f"/v1/models/{name}/v1/completions", json={**body, "model": "dummy"})
                assert own.status_code == 200 and own.json()["model"] == name, own.text
                assert own.json()["choices"][0]["text"] == texts[name]
            assert texts["lm-a"] != texts["lm-b"], "two adapters answered alike"

            unknown = client.post("/v1/completions", json={"model": "nope", "prompt": PROMPT})
            assert unknown.status_code == 404 and "unknown model 'nope'" in unknown.json()["error"]
            unknown = client.post("/v1/models/nope/v1/chat/completions",
                                  json={"model": "lm-a", "messages": [{"role": "user", "content": "hi"}]})
            assert unknown.status_code == 404 and "unknown model 'nope'" in unknown.json()["error"]
    finally:
        server.shutdown()
    for _, merged in exports.values():
        shutil.rmtree(merged, ignore_errors=True)


def test_a_streamed_generation_on_one_adapter_lets_other_adapters_run_between_its_tokens(
        tiny_causal_lm: Path, tmp_path: Path) -> None:
    """A stream holds the replica's base only one token at a time: another adapter's batch, sent while the
    stream runs, is answered before the stream ends, and both answer exactly as they do alone."""
    import threading

    import torch
    from transformers import AutoTokenizer

    from serving.adapters import AdapterStack
    from serving.config import ServeSpec
    from serving.handlers import HANDLERS
    from serving.handlers.causal_lm import Item, Output, Settings
    from serving.multiplex import LoadedAdapter
    from serving.pools import pool_key
    from serving import model_store

    exports = [_lora_lm_export(tiny_causal_lm, tmp_path / name, name, seed)[0] for name, seed in (("sa", 3), ("sb", 4))]
    info, adapter_config = model_store.read_info(exports[0])[0], model_store.read_json(exports[0], "adapter_config.json")
    stack = AdapterStack(pool_key(info, adapter_config), torch.device("cpu"))
    adapters = {}
    for export in exports:
        stack.attach(export.name, export)
        handler = HANDLERS.get("causal-lm")(model_store.read_info(export)[0], ServeSpec(dtype="float32"), stack.routed,
                                            AutoTokenizer.from_pretrained(export), torch.device("cpu"))
        adapters[export.name] = LoadedAdapter(stack, export.name, export, handler, "causal-lm")
    a, b = adapters["sa"], adapters["sb"]

    def item(adapter: LoadedAdapter, tokens: int) -> Item:
        ids = adapter.handler.tokenizer(PROMPT)["input_ids"]
        return Item(PROMPT, tuple(ids), Settings(tokens, 0.0, 1.0, None, ()))

    long_item, short_item = item(a, 60), item(b, 4)
    a_alone = a.run([long_item])[0]
    b_alone = b.run([short_item])[0]
    assert a_alone.completion_tokens >= 20, "the stream is too short to show anything"

    steps, b_done = [0], {}
    pause = a.handler.between_steps

    def send_b() -> None:
        b_done["output"] = b.run([short_item])[0]
        b_done["at_step"] = steps[0]

    sender = threading.Thread(target=send_b)

    def between_steps() -> None:  # the stream's step boundaries, counted; b's request comes at step 3
        steps[0] += 1
        if steps[0] == 3:
            sender.start()
            time.sleep(0.3)  # b is now blocked on the base
        pause()

    a.handler.between_steps = between_steps
    streamed = list(a.handler.stream(long_item))
    sender.join(30)
    final = streamed[-1]
    assert isinstance(final, Output)
    assert b_done["at_step"] < final.completion_tokens - 5, (b_done, final.completion_tokens)
    assert b_done["output"] == b_alone  # b ran with its own adapter active
    assert final.text == a_alone.text and "".join(streamed[:-1]) == a_alone.text  # a got its adapter back
