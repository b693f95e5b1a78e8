"""Prompts for causal-LM fine-tuning: chat templates, an Alpaca-style instruction prompt, response spans.

Each instruction or chat example renders to one text and the character spans of
its responses; tokenizing the text with offsets then says which tokens the loss
trains on (the responses) and which it ignores (prompts, system text, user turns).

A tokenizer without a chat template of its own (GPT-2) gets `FALLBACK_CHAT_TEMPLATE`,
saved with the export, so chat fine-tuning, the `text-generation` pipeline and
`/v1/chat/completions` all render conversations the same way. Instruction rows use
the model's own chat template when it has one (an instruct model already knows
it), and the Alpaca prompt otherwise.
"""

from __future__ import annotations

from typing import Any

# Role tags and the end-of-sequence token after every turn: a model learns to stop after its answer.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

Span = tuple[int, int]  # [start, end) character offsets the loss trains on


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Ready for batching and chat: a pad token (the EOS token when there is none) and a chat template."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def has_own_chat_template(tokenizer: Any) -> bool:
    return bool(tokenizer.chat_template) and tokenizer.chat_template != FALLBACK_CHAT_TEMPLATE


def special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before a text (a BOS token for Llama-style tokenizers; none for GPT-2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def instruction_messages(instruction: str, input_text: str | None, output: str | None = None) -> list[dict[str, str]]:
    content = instruction if not input_text else f"{instruction}\n\n{input_text}"
    messages = [{"role": "user", "content": content}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages


def instruction_prompt(tokenizer: Any, instruction: str, input_text: str | None) -> str:
    """The prompt alone (what a user sends at inference): chat template or Alpaca."""
    if has_own_chat_template(tokenizer):
        return tokenizer.apply_chat_template(instruction_messages(instruction, input_text),
                                             add_generation_prompt=True, tokenize=False)
    template = ALPACA_PROMPT_WITH_INPUT if input_text else ALPACA_PROMPT
    return template.format(instruction=instruction, input=input_text)


def render_instruction(tokenizer: Any, instruction: str, input_text: str | None, output: str) -> tuple[str, list[Span]]:
    """Prompt + response (+ EOS) and the response's span."""
    if has_own_chat_template(tokenizer):
        return render_chat(tokenizer, instruction_messages(instruction, input_text, output))
    prompt = instruction_prompt(tokenizer, instruction, input_text)
    text = prompt + output + (tokenizer.eos_token or "")
    return text, [(len(prompt), len(text))]


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI-style messages → [{"role", "content"}] with text content (content parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a role and a content")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text") or "" for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a text")
        out.append({"role": message["role"], "content": content})
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[Span]]:
    """The conversation through the chat template, and the span of every assistant turn (with its end tag).

    A turn's span runs from the end of the conversation rendered up to it (with the
    generation prompt) to the end of the conversation rendered through it. Templates
    that render earlier turns differently once later ones exist train on the last
    assistant turn only.
    """
    def render(part: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(part, add_generation_prompt=generation_prompt, tokenize=False)

    full = render(messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans: list[Span] = []
    for i in turns:
        before, through = render(messages[:i], True) if i else "", render(messages[:i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            spans = []
            break
        spans.append((len(before), len(through)))
    if not spans and turns and turns[-1] == len(messages) - 1:
        before = render(messages[:-1], True)
        if full.startswith(before):
            spans = [(len(before), len(full))]
        else:
            raise ValueError("the chat template does not render the conversation's prompt as a prefix of the whole; "
                             "set the tokenizer's chat_template to one that does")
    return full, spans


def token_labels(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    """Each token's id where its text starts inside a response span, else -100 (ignored by the loss)."""
    labels = []
    for token, (start, end) in zip(input_ids, offsets):
        inside = end > start and any(s <= start < e for s, e in spans)
        labels.append(token if inside else -100)
    return labels
