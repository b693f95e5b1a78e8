"""Many adapters over one base model in one process: attach, switch, detach (serving/multiplex.py drives it).

An `AdapterStack` holds one base model and the adapters attached to it; `run(name, fn)`
makes `name` the active adapter and runs `fn` (a forward pass) while no other thread
switches or detaches; `run_mixed(rows, ...)` runs one forward pass whose rows use different
adapters (PEFT's mixed-adapter batches: the base's matmuls are shared, each adapter's delta
and head apply to its own rows). Long work under `run` (a streamed generation: one forward
pass per token) calls `pause(name, ...)` between its steps: when other threads wait for the
base, it hands the lock to them and takes it back with its own adapter active again, so a
long stream on one adapter delays another adapter's batch by one step, not by the whole
generation. Two kinds, by what the export's adapter_config.json says:

- PEFT adapters (LoRA, IA3, ...; `peft_type`): one `PeftModel` holding every attached
  adapter by name (PEFT's own multi-adapter support), `set_adapter` to switch. Each
  adapter carries its own copy of the task head (PEFT's `modules_to_save`).
- tunefleet's bottleneck adapters (training/bottleneck.py): the bottleneck modules are
  attached to the base once; switching loads that adapter's tensors (bottlenecks, head,
  layer norms) into them, and restores the base's own tensors for keys it lacks.

Adapters in one stack share the base, the task and the number of labels (the head's
shape): their `PoolKey` (serving/pools.py).
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from serving.model_store import fetch_model
from serving.pools import BASE_MODEL_CLASSES, PoolKey
from training import bottleneck

ADAPTER_CONFIG = bottleneck.CONFIG_FILE


def load_base(key: PoolKey, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers

    cls = getattr(transformers, BASE_MODEL_CLASSES[key.task])
    kwargs: dict[str, Any] = {}
    if key.num_labels:
        kwargs["num_labels"] = key.num_labels
    return cls.from_pretrained(fetch_model(key.base_model), **kwargs).to(device, dtype).eval()


class AdapterStack:
    """One base model and the adapters attached to it; thread-safe switching (see module doc)."""

    def __init__(self, key: PoolKey, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.key = key
        self.device = device
        self.dtype = dtype  # the base's and every adapter's (serving/placement.py)
        self.lock = threading.RLock()  # re-entrant: a garbage-collected LoadedAdapter may detach on this thread
        # Who waits for `lock`, and how many times a waiter got it: `pause` hands over only when someone waits.
        self._queue = threading.Lock()
        self._waiting = 0
        self._handed = 0
        self.base = load_base(key, device, dtype)
        self.model: torch.nn.Module = self.base  # the PeftModel once the first PEFT adapter is attached
        self.active: str | None = None
        self._bottlenecks: dict[str, dict[str, torch.Tensor]] = {}
        self._base_tensors: dict[str, torch.Tensor] = {}
        self._bottleneck_layout: tuple | None = None
        self._stale: set[str] = set()  # detached by the LRU but kept: a PeftModel cannot be left empty
        self._row_adapters: list[str] | None = None  # inside run_mixed: the adapter of each row

    # ---- with the lock held ---------------------------------------------------------------

    def attached(self) -> list[str]:
        if self.key.kind == bottleneck.ADAPTER_TYPE:
            return list(self._bottlenecks)
        return list(getattr(self.model, "peft_config", {}))

    def _attach(self, name: str, export_dir: Path) -> None:
        self._stale.discard(name)
        if name in self.attached():
            return
        if self.key.kind == bottleneck.ADAPTER_TYPE:
            self._attach_bottleneck(name, export_dir)
        elif self.model is self.base:
            from peft import PeftModel

            model = PeftModel.from_pretrained(self.base, str(export_dir), adapter_name=name)
            self.model = model.to(self.device, self.dtype).eval()
        else:
            self.model.load_adapter(str(export_dir), adapter_name=name)
            self.model.to(self.device, self.dtype).eval()
            for stale in self._stale:
                self._detach(stale)
            self._stale.clear()

    def _detach(self, name: str) -> None:
        attached = self.attached()
        if name not in attached:
            return
        if self.key.kind == bottleneck.ADAPTER_TYPE:
            del self._bottlenecks[name]
        elif len(attached) == 1:
            self._stale.add(name)  # a PeftModel keeps at least one adapter: this one goes when another comes
            return
        else:
            if self.active == name:  # PEFT refuses to delete the active adapter
                self.model.set_adapter(next(n for n in attached if n != name))
            self.model.delete_adapter(name)
        if self.active == name:
            self.active = None

    def _activate(self, name: str) -> None:
        if self.active == name:
            return
        if self.key.kind == bottleneck.ADAPTER_TYPE:
            tensors = self._bottlenecks[name]
            restore = {k: v for k, v in self._base_tensors.items() if k not in tensors}
            self.base.load_state_dict({**restore, **tensors}, strict=False)
        else:
            self.model.set_adapter(name)
        self.active = name

    def _attach_bottleneck(self, name: str, export_dir: Path) -> None:
        from safetensors.torch import load_file

        config = json.loads((export_dir / ADAPTER_CONFIG).read_text())
        layout = (tuple(config.get("targets") or ()), config.get("placement"), config.get("reduction_factor"),
                  config.get("activation"))
        if self._bottleneck_layout is None:
            bottleneck.attach(self.base, config)
            self.base.to(self.device, self.dtype).eval()
            self._bottleneck_layout = layout
        elif layout != self._bottleneck_layout:
            raise ValueError(f"{export_dir}: bottleneck layout {layout[1:]} with {len(layout[0])} targets differs "
                             f"from the adapters already served over this base {self._bottleneck_layout[1:]}")
        tensors = load_file(str(export_dir / bottleneck.WEIGHTS_FILE))
        tensors = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
        own = self.base.state_dict()
        unknown = [k for k in tensors if k not in own or own[k].shape != tensors[k].shape]
        if unknown:
            raise ValueError(f"{export_dir}: adapter tensors {unknown[:3]} do not fit the base {self.key.base_model}")
        for k in tensors:  # the base's own value, restored when an adapter without this tensor runs
            if k not in self._base_tensors and ".down." not in k and ".up." not in k:
                self._base_tensors[k] = own[k].detach().clone()
        self._bottlenecks[name] = tensors

    # ---- public: each takes the lock --------------------------------------------------------

    @contextmanager
    def _held(self) -> Iterator[None]:
        with self._queue:
            self._waiting += 1
        self.lock.acquire()
        with self._queue:
            self._waiting -= 1
            self._handed += 1
        try:
            yield
        finally:
            self.lock.release()

    def pause(self, name: str, export_dir: Path, handover_s: float = 0.1) -> None:
        """Between two steps of work running under `run(name, ...)` on this thread: if other threads wait
        for the base, let one of them take it, then wait for it back and make `name` active again (it is
        re-attached if the LRU evicted it meanwhile). Nothing happens when no one waits.

        It waits (briefly, bounded) until a waiter has the lock: Python's locks are not fair, and one released
        and at once re-acquired by the same thread may stay with it, the waiter still waiting."""
        with self._queue:
            if not self._waiting:
                return
            handed = self._handed
        self.lock.release()
        try:
            deadline = time.monotonic() + handover_s  # bounded: a waiter that gave up must not stall the stream
            while time.monotonic() < deadline:
                with self._queue:
                    if self._handed != handed or not self._waiting:
                        break
                time.sleep(0.0005)
        finally:
            self.lock.acquire()  # behind the waiter's batch, if it took the lock
        self._attach(name, export_dir)
        self._activate(name)

    def attach(self, name: str, export_dir: Path) -> None:
        with self._held():
            self._attach(name, export_dir)

    def detach(self, name: str) -> None:
        with self._held():
            self._detach(name)

    def run(self, name: str, export_dir: Path, fn: Callable[[], Any]) -> Any:
        """`fn()` with `name` active; re-attaches it first if it was detached (evicted) meanwhile."""
        with self._held():
            self._attach(name, export_dir)
            self._activate(name)
            return fn()

    @property
    def mixes(self) -> bool:
        """Rows of one forward pass can use different adapters (PEFT's `adapter_names`); bottlenecks cannot."""
        return self.key.kind != bottleneck.ADAPTER_TYPE

    def run_mixed(self, rows: list[str], export_dirs: dict[str, Path], fn: Callable[[], Any]) -> Any:
        """`fn()` whose forward passes through `routed` use adapter `rows[i]` for row i: one pass for many adapters."""
        with self._held():
            for name, export_dir in export_dirs.items():
                self._attach(name, export_dir)
            self._row_adapters = rows
            try:
                return fn()
            finally:
                self._row_adapters = None

    @property
    def routed(self) -> RoutedModel:
        """The model for task handlers: the active adapter, or per-row adapters inside `run_mixed`."""
        return RoutedModel(self)


class RoutedModel:
    """Stands in for the stack's model in a task handler: calls pass `adapter_names` during `run_mixed`."""

    def __init__(self, stack: AdapterStack) -> None:
        self._stack = stack

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rows = self._stack._row_adapters
        return self._stack.model(*args, **kwargs, **({"adapter_names": rows} if rows is not None else {}))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        rows = self._stack._row_adapters
        return self._stack.model.generate(*args, **kwargs, **({"adapter_names": rows} if rows is not None else {}))

    def __getattr__(self, name: str) -> Any:  # config, device, eval(), to(), ...
        return getattr(self._stack.model, name)
