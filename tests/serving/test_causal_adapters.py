"""LoRA adapters of a causal LM multiplexed over one base: OpenAI routes (plain and streamed) and /predict,
each adapter answering as the same adapter merged into a full model does, in-process."""

from __future__ import annotations

import json
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
            assert texts["lm-a"] != texts["lm-b"], "two adapters answered alike"

            unknown = client.post("/v1/completions", json={"model": "nope", "prompt": PROMPT})
            assert unknown.status_code == 404 and "unknown model 'nope'" in unknown.json()["error"]
    finally:
        server.shutdown()
    for _, merged in exports.values():
        shutil.rmtree(merged, ignore_errors=True)
