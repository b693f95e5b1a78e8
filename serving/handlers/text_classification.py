"""Text classification (single texts or text pairs): softmax over the export's labels (sigmoid for a
multi-label model; `function_to_apply` picks, as in the pipeline).

Two changes to a BERT-family model's work, neither to its scores (the full model's, to float
rounding); both touch only the architectures training.unread_positions lists:
- its last encoder layer computes only the first position, the one the classification head reads
  (training.unread_positions, which training uses too): MiniLM classifies 1.14x as many 50-token
  texts a second in batches of 16 (fp32, 2 threads: 136 vs 120; int8: 199 vs 172);
- its layers skip the batch's padding (serving/packed.py): a batch of texts of mixed lengths no
  longer pays for the longest one's length in every row (MiniLM, AG News texts in batches of 16:
  1.49x as many sequences a second).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from serving.config import ServeSpec
from serving.errors import ServingError
from serving.handlers.base import TaskHandler, input_window, load_model, ranked
from serving.handlers.registry import register_handler
from serving.packed import skip_padding
from serving.placement import place, replica_device
from serving.schemas import TextClassificationRequest, TextClassificationResponse, TextPair
from training.layout import ExportInfo
from training.unread_positions import skip_unread_positions

# One item: (text, text_pair or None). One output: its logits, in label order.
Item = tuple[str, "str | None"]
Logits = list[float]


@register_handler("text-classification")
class TextClassificationHandler(TaskHandler):
    request_model = TextClassificationRequest
    response_model = TextClassificationResponse

    def __init__(self, info: ExportInfo, spec: ServeSpec, model, tokenizer, device: torch.device) -> None:
        super().__init__(info, spec)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = input_window(info, tokenizer, model)
        id2label = model.config.id2label
        num_labels = model.config.num_labels
        self.labels = (
            list(info.labels) if len(info.labels) == num_labels else [str(id2label[i]) for i in range(num_labels)]
        )
        self.multi_label = model.config.problem_type == "multi_label_classification"

    @classmethod
    def load(cls, export_dir: Path, info: ExportInfo, spec: ServeSpec) -> TextClassificationHandler:
        device = replica_device(spec)
        tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
        model, plain = load_model(AutoModelForSequenceClassification, export_dir, info)
        if plain:
            skip_unread_positions(model)
            skip_padding(model)
        return cls(info, spec, place(model, spec, device, cls.auto_bfloat16), tokenizer, device)

    def prepare(self, request: TextClassificationRequest) -> list[Item]:
        inputs = request.input_list()
        limit = self.spec.max_inputs_per_request
        if len(inputs) > limit:
            raise ServingError(
                413, f"too many inputs: {len(inputs)} in one request, at most {limit}", {"max_inputs_per_request": limit}
            )
        items = [(x.text, x.text_pair) if isinstance(x, TextPair) else (x, None) for x in inputs]
        self._refuse_other_kind(items)
        longest = self.spec.max_input_chars
        for i, (text, pair) in enumerate(items):
            size = len(text) + len(pair or "")
            if size > longest:
                raise ServingError(
                    413, f"input {i} is too long: {size} characters, at most {longest}", {"max_input_chars": longest}
                )
        return items

    def _refuse_other_kind(self, items: list[Item]) -> None:
        """A model trained on sentence pairs scores a lone text (and the other way round) without complaint, and
        the score means nothing: refused, where the export says which kind it was trained on."""
        pairs = self.info.text_pairs
        if pairs is None:
            return
        for i, (_, pair) in enumerate(items):
            if (pair is not None) != pairs:
                wanted = '{"text": ..., "text_pair": ...}' if pairs else "a text"
                raise ServingError(
                    422, f"input {i} is {'a text pair' if pair is not None else 'a single text'}, but "
                         f"this model was trained on {'sentence pairs' if pairs else 'single texts'}: send {wanted}",
                    {"field": f"inputs[{i}]", "text_pairs": pairs})

    @torch.inference_mode()
    def run_batch(self, items: list[Item]) -> list[Logits]:
        outputs: list[Logits | None] = [None] * len(items)
        # A tokenizer call takes texts alone or all with pairs: one forward per kind present.
        for with_pair in (False, True):
            index = [i for i, (_, pair) in enumerate(items) if (pair is not None) == with_pair]
            if not index:
                continue
            texts = [items[i][0] for i in index]
            pairs = [items[i][1] for i in index] if with_pair else None
            encoded = self.tokenizer(
                texts, pairs, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            for i, row in zip(index, self.model(**encoded).logits.float().tolist()):
                outputs[i] = row
        return outputs  # type: ignore[return-value]

    def hf_format(self, predictions: list[Any], request: TextClassificationRequest, single: bool) -> Any:
        return predictions  # the Inference API nests even one input's labels: [[{"label", "score"}, ...]]

    def format(self, output: Logits, request: TextClassificationRequest) -> list[dict[str, float | str]]:
        p = request.parameters
        function = p.function_to_apply or ("sigmoid" if self.multi_label else "softmax")
        return ranked(self.labels, output, function, p.top_k)
