"""The `head` method's feature cache: the frozen backbone runs once per example, later epochs run the head.

`method: {name: head, cache_features: true}`. The training loop calls its model as usual, inside
`cache.serving(examples, batch)`:

- every example of the batch seen before: for this one forward the backbone's (`model.<base_model_prefix>`)
  `forward` returns the stored outputs without computing anything, and the model's own forward
  runs everything after it (dropout, pooling, classifier). Each architecture's head is respected
  because it is that model's own code. The module tree is never changed (DDP syncs the same
  buffers on every rank, hit or miss), so the checkpoint and the export are the same model's.
- otherwise (the first epoch, a resumed run, an example another rank saw first under DDP): the
  model runs as it would uncached, and a forward hook stores the backbone's output per example.

Only what the head reads is stored. At the first batch a probe asks autograd which backbone
outputs the head's logits depend on (an output it never reads gets no gradient) and whether it
reads the first position only (a CLS head: RoBERTa's or ViT's first token); BERT's head reads the
pooler output alone, so a MiniLM example costs 384 floats. The probe then checks that the logits
from stored features equal the live model's on that batch; if not, it keeps every position, and if
they still differ it stops with a message. Token outputs are stored without padding (by the
batch's attention mask) and padded back with zeros.

The backbone must give an example the same output every epoch: the head method runs it in eval
mode (no dropout) with caching, and validation refuses augmented images (training/methods/head.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

_TENSOR = "<tensor>"  # the one "field" of a backbone that returns a bare tensor (torchvision)


@dataclass(frozen=True)
class _Field:
    name: str
    mode: str  # "first": position 0 only; "whole": all of it; "unused": not stored, zeros of its shape
    masked: bool  # dim 1 is the batch's token axis (attention mask): stored without padding
    shape: tuple[int, ...]  # one example's shape at the probe (a masked field's length varies)
    dtype: torch.dtype


def cached_features(spec: Any, model: torch.nn.Module) -> FeatureCache | None:
    """A FeatureCache for the (unwrapped) training model when the method asks for one, else None."""
    if not getattr(spec.method_options(), "cache_features", False):
        return None
    return FeatureCache(model)


class FeatureCache:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.prefix = model.base_model_prefix
        self.backbone = getattr(model, self.prefix)
        self.fields: list[_Field] | None = None
        self.output_type: type | None = None
        self.store: dict[int, tuple[torch.Tensor, ...]] = {}
        self.hits = self.misses = 0
        self._pending: tuple[list[int], dict] | None = None
        self._announced = False
        self.backbone.register_forward_hook(self._capture)

    @contextmanager
    def serving(self, examples: list[int], batch: dict) -> Iterator[None]:
        """Within: the model's backbone answers from the cache for these examples, or runs and fills it."""
        if self.fields is None:
            self.fields = self._probe(batch)
        if all(i in self.store for i in examples):
            self.hits += len(examples)
            self._announce()
            with _answering(self.backbone, self._assemble([self.store[i] for i in examples], batch)):
                yield
            return
        self.misses += len(examples)
        self._pending = (list(examples), batch)
        try:
            yield
        finally:
            self._pending = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.store.values() for t in parts)

    # ---- storing and rebuilding -------------------------------------------------------------

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._pending is None:
            return  # evaluation, or a forward outside serving()
        examples, batch = self._pending
        self._pending = None  # once per forward
        for index, parts in zip(examples, self._split(output, batch)):
            self.store.setdefault(index, parts)

    def _split(self, output: Any, batch: dict) -> list[tuple[torch.Tensor, ...]]:
        """One tuple of stored tensors per example of the batch (on the CPU, padding removed)."""
        values = dict(_items(output))
        mask = batch.get("attention_mask")
        rows = []
        for j in range(len(next(iter(values.values())))):
            parts = []
            for field in self.fields:
                if field.mode == "unused":
                    continue
                value = values[field.name][j].detach()
                if field.mode == "first":
                    value = value[:1]
                elif field.masked:
                    value = value[mask[j].bool()]
                parts.append(value.to("cpu", copy=True))
            rows.append(tuple(parts))
        return rows

    def _assemble(self, rows: list[tuple[torch.Tensor, ...]], batch: dict) -> Any:
        """The backbone's output for a batch, rebuilt from stored rows (what the head reads; zeros elsewhere)."""
        mask = batch.get("attention_mask")
        reference = next(v for v in batch.values() if torch.is_tensor(v))
        device, size = reference.device, len(rows)
        values, stored = {}, 0
        for field in self.fields:
            shape = list(field.shape)
            if field.masked:
                shape[0] = mask.shape[1]
            if field.mode == "unused":
                values[field.name] = torch.zeros((), dtype=field.dtype, device=device).expand(size, *shape)
                continue
            pieces = [row[stored] for row in rows]
            stored += 1
            if field.mode == "whole" and field.masked:
                value = torch.zeros((size, *shape), dtype=field.dtype)
                for j, piece in enumerate(pieces):
                    value[j, mask[j].bool().cpu()] = piece
            else:
                value = torch.stack(pieces)
            values[field.name] = value.to(device, non_blocking=True)
        if _TENSOR in values:
            return values[_TENSOR]
        return self.output_type(**values)

    # ---- the probe ----------------------------------------------------------------------------

    def _probe(self, batch: dict) -> list[_Field]:
        """Which backbone outputs the head reads, checked against the live model on this batch."""
        was_training = self.model.training
        self.model.eval()  # no dropout: the probe draws no random numbers, so the run's stream is unchanged
        try:
            captured = []
            handle = self.backbone.register_forward_hook(lambda module, args, output: captured.append(output))
            try:
                with torch.no_grad():
                    live_logits = _logits(self.model(**batch))
            finally:
                handle.remove()
            live = captured[0]
            if not torch.is_tensor(live):
                self.output_type = type(live)
            for first_allowed in (True, False):
                self.fields = self._plan(live, batch, first_allowed)
                with torch.no_grad():
                    rebuilt = self._head(self._assemble(self._split(live, batch), batch), batch)
                if rebuilt.shape == live_logits.shape and torch.allclose(rebuilt.float(), live_logits.float(),
                                                                         rtol=1e-4, atol=1e-5):
                    read = ", ".join(f"{f.name} ({'first position' if f.mode == 'first' else 'all'})"
                                     for f in self.fields if f.mode != "unused") or "nothing"
                    print(f"feature cache: the head of {type(self.model).__name__} reads {read} of the backbone's output")
                    return self.fields
            self.fields = None
            raise RuntimeError(
                f"method.cache_features: {type(self.model).__name__}'s head gives other outputs from stored backbone "
                "features than from the live backbone (it reads more than the backbone's output); "
                "set method.cache_features: false")
        finally:
            self.model.train(was_training)

    def _plan(self, live: Any, batch: dict, first_allowed: bool) -> list[_Field]:
        items = _items(live)
        leaves = [value.detach().clone().requires_grad_(value.is_floating_point()) for _, value in items]
        with torch.enable_grad():
            rebuilt = leaves[0] if torch.is_tensor(live) else self.output_type(
                **{name: leaf for (name, _), leaf in zip(items, leaves)})
            logits = self._head(rebuilt, batch)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = (torch.autograd.grad(logits, wanted, grad_outputs=torch.ones_like(logits), allow_unused=True)
                     if logits.requires_grad and wanted else [None] * len(wanted))
        by_leaf = dict(zip(map(id, wanted), grads))
        mask = batch.get("attention_mask")
        fields = []
        for (name, value), leaf in zip(items, leaves):
            grad = by_leaf.get(id(leaf), torch.ones_like(value))  # integer outputs: keep them whole
            masked = mask is not None and value.ndim >= 3 and value.shape[1] == mask.shape[1]
            if grad is None:
                mode = "unused"
            elif first_allowed and value.ndim >= 3 and grad[:, 1:].abs().sum() == 0 and grad[:, :1].abs().sum() > 0:
                mode = "first"
            else:
                mode = "whole"
            fields.append(_Field(name, mode, masked, tuple(value.shape[1:]), value.dtype))
        return fields

    def _head(self, backbone_output: Any, batch: dict) -> torch.Tensor:
        with _answering(self.backbone, backbone_output):
            return _logits(self.model(**batch))

    def _announce(self) -> None:
        if not self._announced:
            self._announced = True
            print(f"feature cache: {len(self.store)} examples stored ({self.nbytes() / 2**20:.1f} MiB); "
                  "the backbone no longer runs for them")


@contextmanager
def _answering(module: torch.nn.Module, output: Any) -> Iterator[None]:
    """Within: calling `module` returns `output`, whatever it is called with (an instance attribute shadows the
    class's forward; the module's hooks still run, its parameters and buffers stay where they are)."""
    shadowed = module.__dict__.get("forward")
    module.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        if shadowed is None:
            del module.forward
        else:
            module.forward = shadowed


def _items(output: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of a backbone's output: a tensor, or a Hugging Face ModelOutput's tensor fields."""
    if torch.is_tensor(output):
        return [(_TENSOR, output)]
    if hasattr(output, "items"):
        return [(name, value) for name, value in output.items() if torch.is_tensor(value)]
    raise TypeError(f"method.cache_features: cannot store a backbone output of type {type(output).__name__}; "
                    "set method.cache_features: false")


def _logits(outputs: Any) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs
