"""Adapters multiplexed over one base: one Serve application per adapter pool.

A pool's replicas each hold the base model once (serving/adapters.py) and load adapters
on first use with `@serve.multiplexed`: a per-replica LRU of at most
`max_models_per_replica` adapters; the least recently used one is detached when another
must load. The pool has no HTTP route of its own: the root application resolves
`/v1/models/{name}/predict` to an `AdapterEntry` (serving/registration.py) and calls

    pool.options(multiplexed_model_id=entry.model_id).predict.remote(entry, body)

so Serve's router prefers a replica that already holds that adapter, when the pool has
more adapters than a replica keeps (or `affinity: true`); otherwise the id is left out, requests
spread by load, and batches mix adapters (Serve splits a batch by multiplexed id). The entry travels
with the request, so a replica needs no registry lookup to load an adapter it has never
seen. A model id is `name@version` (version: digest of the export's tunefleet.json):
re-registering a name with a new export makes replicas load the new one; the old one
ages out of their LRU.

Dynamic batching gathers items for any adapter of the pool. For text classification over
PEFT adapters, one forward pass serves every adapter in the batch (PEFT's mixed-adapter
batches); otherwise a batch runs one forward pass per adapter present in it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray import serve
from ray.serve import Application

from serving.pools import PoolKey
from serving.config import ServeSpec
from serving.errors import ServingError
from serving.schemas import ModelCard
from training.layout import ExportInfo

POOL_DEPLOYMENT = "AdapterPool"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterEntry:
    """One servable adapter: its name, where its export is, which pool serves it. Picklable and JSON-able."""

    name: str
    source: str  # absolute local path or storage URI of the export
    version: str
    info: ExportInfo
    pool: str  # the pool's application name

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    def card(self) -> ModelCard:
        return ModelCard(name=self.name, task=self.info.task, labels=list(self.info.labels),
                         base_model=self.info.base_model, version=self.version)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "version": self.version,
                "info": self.info.model_dump(mode="json"), "pool": self.pool}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterEntry:
        return cls(name=data["name"], source=data["source"], version=data["version"],
                   info=ExportInfo.model_validate(data["info"]), pool=data["pool"])


@dataclass(frozen=True)
class AdapterPool:
    """One set of base-model replicas serving every adapter with the same `PoolKey`."""

    app_name: str
    key: PoolKey
    spec: ServeSpec
    max_models_per_replica: int
    # True: requests carry the adapter's id, so Serve's router prefers replicas that hold it (fewer loads when
    # a replica cannot keep every adapter) and Serve batches each adapter's requests apart. False: requests
    # spread over all replicas by load, and one forward pass serves many adapters. None (auto): true once the
    # pool has more adapters than max_models_per_replica.
    affinity: bool | None = None


# Tasks whose batches may mix adapters in one forward pass: how to split items so that a handler's
# forward rows follow item order (text classification runs texts and text pairs as separate passes).
MIXED_BATCH_SPLIT = {"text-classification": lambda item: item[1] is not None}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                    "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def tokenizer_fingerprint(export_dir: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        path = export_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class LoadedAdapter:
    """What the multiplexed LRU holds: an adapter attached to the replica's stack, and its task handler."""

    def __init__(self, stack, model_id: str, local: Path, handler, task: str) -> None:
        self.stack, self.model_id, self.local, self.handler = stack, model_id, local, handler
        self.evicted = False
        # Work outside batches (a streamed generation) holds the base with this adapter active, and hands it
        # to batches waiting for it between two of its steps (AdapterStack.pause).
        handler.exclusive = self.exclusive
        handler.between_steps = lambda: stack.pause(model_id, local)
        # Adapters with equal mix keys share one forward pass in a batch: same tokenizer, same max length.
        self.mix_key = ((tokenizer_fingerprint(local), getattr(handler, "max_length", None))
                        if stack.mixes and task in MIXED_BATCH_SPLIT else None)

    def run(self, items: list[Any]) -> list[Any]:
        return self.exclusive(lambda: self.handler.run_batch(items))

    def exclusive(self, fn: Callable[[], Any]) -> Any:
        """`fn()` with this adapter active on the base."""
        result = self.stack.run(self.model_id, self.local, fn)
        if self.evicted:  # evicted while its work waited or ran: re-attached for it, detached again
            self.stack.detach(self.model_id)
        return result

    def __del__(self) -> None:
        # Serve's LRU calls this on eviction (in a thread); the garbage collector may call it again.
        if not self.evicted:
            self.evicted = True
            self.stack.detach(self.model_id)


def run_items(stack, pairs: list[tuple[LoadedAdapter, Any]]) -> list[Any]:
    """One batch of (adapter, item) pairs: adapters that can share a forward pass share one."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (adapter, _) in enumerate(pairs):
        groups[("mixed", adapter.mix_key) if adapter.mix_key is not None else ("one", adapter.model_id)].append(i)
    outputs: list[Any] = [None] * len(pairs)
    for index in groups.values():
        members = [pairs[i][0] for i in index]
        if len({a.model_id for a in members}) == 1:
            results = members[0].run([pairs[i][1] for i in index])
        else:  # one forward pass, each row through its own adapter
            results = run_mixed(stack, [pairs[i] for i in index], MIXED_BATCH_SPLIT[members[0].handler.task])
        for i, result in zip(index, results):
            outputs[i] = result
    return outputs


def run_mixed(stack, pairs: list[tuple[LoadedAdapter, Any]], split) -> list[Any]:
    """One forward pass per `split` kind for items of many adapters; the first adapter's handler runs it."""
    lead = pairs[0][0]
    outputs: list[Any] = [None] * len(pairs)
    for kind in (False, True):
        index = [i for i, (_, item) in enumerate(pairs) if split(item) == kind]
        if not index:
            continue
        rows = [pairs[i][0].model_id for i in index]
        local = {pairs[i][0].model_id: pairs[i][0].local for i in index}
        results = stack.run_mixed(rows, local, lambda: lead.handler.run_batch([pairs[i][1] for i in index]))
        for i, result in zip(index, results):  # logits by head position: each adapter's own format names them
            outputs[i] = result
    for adapter in {id(a): a for a, _ in pairs}.values():
        if adapter.evicted:
            stack.detach(adapter.model_id)
    return outputs


def build_adapter_pool_app(pool: AdapterPool, env_vars: dict[str, str] | None = None) -> Application:
    """The pool's application: base-model replicas, multiplexed adapters, dynamic batching."""
    spec = pool.spec

    class AdapterPoolServer:
        def __init__(self, pool: AdapterPool) -> None:
            from serving.adapters import AdapterStack
            from serving.handlers import HANDLERS
            from serving.placement import replica_device, serving_dtype

            self.device = replica_device(spec)
            auto_bfloat16 = HANDLERS.get(pool.key.task).auto_bfloat16
            self.stack = AdapterStack(pool.key, self.device, serving_dtype(spec, self.device, auto_bfloat16))
            self.entries: dict[str, AdapterEntry] = {}
            self.replica = serve.get_replica_context().replica_id.unique_id

        def _load(self, entry: AdapterEntry) -> LoadedAdapter:
            from transformers import AutoTokenizer

            from serving import model_store
            from serving.handlers import HANDLERS

            local = model_store.fetch(entry.source)
            self.stack.attach(entry.model_id, local)
            tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
            handler = HANDLERS.get(entry.info.task)(entry.info, spec, self.stack.routed, tokenizer, self.device)
            return LoadedAdapter(self.stack, entry.model_id, local, handler, entry.info.task)

        @serve.multiplexed(max_num_models_per_replica=pool.max_models_per_replica)
        async def adapter(self, model_id: str) -> LoadedAdapter:
            entry = self.entries[model_id]
            try:
                return await asyncio.to_thread(self._load, entry)
            except Exception as exc:  # a registered export that cannot be loaded is the server's problem, not a 500
                logger.exception("loading adapter %s from %s failed", model_id, entry.source)
                raise ServingError(503, f"model {entry.name!r} could not be loaded from {entry.source}: {exc}",
                                   {"model": entry.name, "source": entry.source}) from None

        @serve.batch(max_batch_size=spec.max_batch_size, batch_wait_timeout_s=spec.batch_wait_ms / 1000)
        async def run_batch(self, items: list[tuple[str, Any]]) -> list[Any]:
            # Reloads one evicted while its items waited (kept usable for this batch even if evicted again).
            adapters = {m: await self.adapter(m) for m in dict.fromkeys(m for m, _ in items)}
            # Off the event loop: it keeps reading requests (the next batch) while torch computes.
            return await asyncio.to_thread(run_items, self.stack, [(adapters[m], item) for m, item in items])

        async def load(self, entry: AdapterEntry) -> dict[str, Any]:
            """Load (or find) the adapter on this replica; registration calls it to prove the export loads."""
            self.entries[entry.model_id] = entry
            await self.adapter(entry.model_id)
            return {"model": entry.name, "replica": self.replica}

        async def predict(self, entry: AdapterEntry, body: Any, hf_single: bool | None = None) -> dict[str, Any]:
            """`hf_single` not None: answered in the Hugging Face Inference API's shape, under "hf" (serving/hf_compat.py)."""
            from serving.handlers import parse_request

            self.entries[entry.model_id] = entry
            adapter = await self.adapter(entry.model_id)
            request = parse_request(adapter.handler, body)
            items = adapter.handler.prepare(request)
            outputs = await asyncio.gather(*(self.run_batch((entry.model_id, item)) for item in items))
            predictions = [adapter.handler.format(output, request) for output in outputs]
            if hf_single is not None:
                return {"hf": adapter.handler.hf_format(predictions, request, hf_single), "replica": self.replica}
            return {"model": entry.name, "predictions": predictions, "replica": self.replica}

        async def openai(self, entry: AdapterEntry, route: str, request: Any) -> dict[str, Any]:
            """An OpenAI completion or chat request for a causal-LM adapter (the root's /v1/... routes)."""
            self.entries[entry.model_id] = entry
            adapter = await self.adapter(entry.model_id)
            items = adapter.handler.openai_prepare(route, request)
            outputs = await asyncio.gather(*(self.run_batch((entry.model_id, item)) for item in items))
            return adapter.handler.openai_format(route, request, outputs)

        async def openai_stream(self, entry: AdapterEntry, route: str, request: Any):
            """The same, streamed: server-sent events as tokens come (between two, waiting batches use the base)."""
            self.entries[entry.model_id] = entry
            adapter = await self.adapter(entry.model_id)
            events = adapter.handler.openai_stream(route, request)
            while (event := await asyncio.to_thread(next, events, None)) is not None:
                yield event

        async def attached(self) -> dict[str, Any]:
            """This replica's attached adapters (model ids), for tests and operators."""
            return {"replica": self.replica, "attached": sorted(self.stack.attached()), "pid": os.getpid()}

    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}}
    deployment = serve.deployment(
        name=POOL_DEPLOYMENT,
        max_ongoing_requests=spec.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": spec.min_replicas,
            "initial_replicas": max(spec.min_replicas, 1),
            "max_replicas": spec.max_replicas,
            "target_ongoing_requests": spec.target_ongoing_requests,
            "upscale_delay_s": spec.upscale_delay_s,
            "downscale_delay_s": spec.downscale_delay_s,
        },
        graceful_shutdown_timeout_s=spec.graceful_shutdown_timeout_s,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "runtime_env": runtime_env},
    )(AdapterPoolServer)
    return deployment.bind(pool)
