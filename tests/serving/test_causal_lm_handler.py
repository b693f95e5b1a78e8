"""The causal-LM handler in-process (no Ray): generation settings, stop texts, streaming, limits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from serving.errors import ServingError
from serving.handlers import load_handler, parse_request
from serving.openai_compat import CHAT, COMPLETIONS, ChatCompletionRequest, CompletionRequest


@pytest.fixture(scope="module")
def handler(tiny_causal_lm: Path, tmp_path_factory):
    from training.data.prompts import prepare_tokenizer
    from training.layout import ExportInfo, write_export_info
    from transformers import AutoTokenizer

    export = tmp_path_factory.mktemp("lm-export")
    shutil.copytree(tiny_causal_lm, export, dirs_exist_ok=True)
    prepare_tokenizer(AutoTokenizer.from_pretrained(export)).save_pretrained(export)  # as training exports it
    write_export_info(export, ExportInfo(name="tiny-lm", task="causal-lm", base_model="tiny", method="full"))
    return load_handler(export)


def _predict(handler, inputs, **parameters):
    return handler.predict(parse_request(handler, {"inputs": inputs, "parameters": parameters}))


def test_greedy_generation_is_deterministic_and_counts_tokens(handler):
    first = _predict(handler, ["the cat", "a bird sat on"], max_new_tokens=5)
    again = _predict(handler, ["the cat", "a bird sat on"], max_new_tokens=5)
    assert first == again and len(first) == 2
    for output in first:
        assert output["finish_reason"] in ("stop", "length") and output["completion_tokens"] <= 5
    alone = _predict(handler, "a bird sat on", max_new_tokens=5)[0]
    assert alone["generated_text"] == first[1]["generated_text"]  # left padding in a batch changes nothing
    full = _predict(handler, "the cat", max_new_tokens=5, return_full_text=True)[0]
    assert full["generated_text"] == "the cat" + first[0]["generated_text"]


def test_do_sample_and_repetition_penalty_as_generate_takes_them(handler):
    """What Hugging Face clients send (InferenceClient.text_generation's do_sample, repetition_penalty)."""
    def temperature(**parameters) -> float:
        [item] = handler.prepare(parse_request(handler, {"inputs": "x", "parameters": parameters}))
        return item.settings.temperature

    assert temperature() == 0 and temperature(temperature=0.7) == 0.7
    assert temperature(do_sample=False, temperature=1.5) == 0  # greedy whatever the temperature
    assert temperature(do_sample=True) == 1.0 and temperature(do_sample=True, temperature=0.3) == 0.3
    greedy = _predict(handler, "the cat", max_new_tokens=6)
    assert _predict(handler, "the cat", max_new_tokens=6, do_sample=False, temperature=1.5) == greedy

    import torch

    prompt = handler.tokenizer("the cat", return_tensors="pt")
    with torch.inference_mode():  # the library's own repetition penalty, called directly
        ids = handler.model.generate(**prompt, max_new_tokens=12, do_sample=False, repetition_penalty=5.0,
                                     pad_token_id=handler.pad_id)[0, prompt["input_ids"].shape[1]:]
    penalised = _predict(handler, "the cat", max_new_tokens=12, repetition_penalty=5.0)[0]
    assert penalised["generated_text"] == handler.tokenizer.decode(ids, skip_special_tokens=True)[
        :len(penalised["generated_text"])]
    assert penalised["generated_text"] != _predict(handler, "the cat", max_new_tokens=12)[0]["generated_text"]


def test_the_inference_api_shape_is_the_pipelines_generations(handler):
    """InferenceClient.text_generation reads `answer[0]["generated_text"]`; a list of prompts gets a list each."""
    from testdata import hf_answer

    parameters = {"max_new_tokens": 4}
    [one] = hf_answer(handler, {"inputs": "Once upon", "parameters": parameters, "stream": False})
    assert one == _predict(handler, "Once upon", **parameters)[0]
    assert [[g["generated_text"] for g in p] for p in hf_answer(handler, {"inputs": ["a", "b"], "parameters": parameters})] \
        == [[p["generated_text"]] for p in _predict(handler, ["a", "b"], **parameters)]


def test_stop_texts_cut_before_the_first_match(handler):
    text = _predict(handler, "the cat", max_new_tokens=12)[0]["generated_text"]
    stop = text.strip()[:2] if text.strip() else "x"
    cut = _predict(handler, "the cat", max_new_tokens=12, stop=[stop, "zzz"])[0]
    assert stop not in cut["generated_text"] and text.startswith(cut["generated_text"])
    assert cut["finish_reason"] == "stop"


def test_whitespace_is_a_stop_text_on_both_routes(handler):
    """"\n\n" is the stop text most clients send (the README's example): a blank text, but not an empty one."""
    cut = _predict(handler, "the cat", max_new_tokens=12, stop=["\n\n", " "])[0]
    assert " " not in cut["generated_text"] and "\n\n" not in cut["generated_text"]
    assert CompletionRequest(model="tiny-lm", prompt="the dog", stop="\n").stop_list() == ["\n"]


def test_streaming_sends_the_same_text_as_one_answer(handler):
    request = CompletionRequest(model="tiny-lm", prompt="the dog", max_tokens=10, temperature=0, stream=True)
    whole = handler.openai_format(COMPLETIONS, request, handler.run_batch(handler.openai_prepare(COMPLETIONS, request)))
    events = list(handler.openai_stream(COMPLETIONS, request))
    assert events[-1] == "data: [DONE]\n\n" and all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + whole["usage"]["completion_tokens"]


def test_chat_uses_the_exported_template(handler):
    request = ChatCompletionRequest(model="tiny-lm", max_tokens=4, temperature=0,
                                    messages=[{"role": "developer", "content": "be brief"},
                                              {"role": "user", "content": [{"type": "text", "text": "the cat"}]}])
    item = handler.openai_prepare(CHAT, request)[0]
    assert item.prompt.endswith("<|assistant|>\n") and "<|system|>\nbe brief" in item.prompt
    body = handler.openai_format(CHAT, request, handler.run_batch([item]))
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("payload, status, words", [
    ({"inputs": "the cat " * 100}, 413, "context"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 128}}, 422, "at most 127"),
    ({"inputs": ["x"] * 300}, 413, "too many prompts"),
    ({"inputs": "x" * 200_000}, 413, "characters"),
    ({"inputs": []}, 422, "at least one"),
    ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, 422, "stop"),
    ({"inputs": "x", "parameters": {"stop": ["\n", ""]}}, 422, "parameters.stop[1]: must be a non-empty text"),
    ({"inputs": "x", "parameters": {"top_p": 0}}, 422, "top_p"),
    ({"inputs": "x", "parameters": {"do_sample": True, "temperature": 0}}, 422, "sampling needs a temperature"),
    ({"inputs": "x", "parameters": {"repetition_penalty": 0}}, 422, "repetition_penalty"),
])
def test_limits_and_bad_parameters_are_4xx(handler, payload, status, words):
    with pytest.raises(ServingError) as caught:
        handler.predict(parse_request(handler, payload))
    assert caught.value.status == status and words in caught.value.error


def test_openai_parameters_without_an_effect_pass_at_their_neutral_value_only():
    """Clients send OpenAI's defaults (LangChain: penalties 0, best_of 1, logit_bias {}): accepted, as they change
    nothing; any other value of a parameter these models do not implement is refused, naming it."""
    import pydantic

    user = [{"role": "user", "content": "hi"}]
    ChatCompletionRequest(model="m", messages=user, frequency_penalty=0, presence_penalty=0.0, logit_bias={},
                          logprobs=False, top_logprobs=0, n=1)
    CompletionRequest(model="m", prompt="x", best_of=1, echo=False, logprobs=None, suffix="", frequency_penalty=0)
    for model, field, value, fix in ((ChatCompletionRequest, "frequency_penalty", 0.5, "send 0"),
                                     (ChatCompletionRequest, "logit_bias", {"50256": -100}, "send {}"),
                                     (ChatCompletionRequest, "logprobs", True, "send false"),
                                     (CompletionRequest, "logprobs", 0, "send null"),
                                     (CompletionRequest, "best_of", 2, "send 1"),
                                     (CompletionRequest, "echo", True, "send false")):
        body = {"model": "m", **({"messages": user} if model is ChatCompletionRequest else {"prompt": "x"})}
        with pytest.raises(pydantic.ValidationError) as caught:
            model.model_validate({**body, field: value})
        (error,) = caught.value.errors()
        assert error["loc"] == (field,) and fix in error["msg"], error
