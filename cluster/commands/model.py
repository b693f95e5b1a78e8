"""`tunefleet predict | serve`: using exported models."""

from __future__ import annotations

import base64
import contextlib
import json
import sys
from pathlib import Path


def register(commands) -> None:
    predict = commands.add_parser("predict", help="predict with an export, without a server; prints JSON")
    predict.add_argument("export_dir", help="export directory (or a run directory holding export/)")
    predict.add_argument("inputs", nargs="+",
                         help="texts ('first ||| second' gives a sentence pair), or image files for an image model")
    predict.add_argument("--top-k", type=int, default=None, help="labels per input (default: the task's default)")
    predict.set_defaults(handler=_predict)

    serve = commands.add_parser("serve", help="serve exports over HTTP with Ray Serve until SIGINT/SIGTERM")
    serve.add_argument("exports", nargs="+", help="export directories (or run directories)")
    serve.add_argument("--name", action="append", default=None, help="model name per export (default: the job name)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--address", help="Ray cluster address (default: a private local Ray)")
    serve.set_defaults(handler=_serve)


def _predict(args) -> int:
    from serving import predict_local

    if _is_image_export(args.export_dir):  # image files → base64, as an HTTP client sends them
        inputs = [base64.b64encode(Path(name).read_bytes()).decode() for name in args.inputs]
    else:
        inputs = [{"text": t.split("|||")[0].strip(), "text_pair": t.split("|||")[1].strip()} if "|||" in t else t
                  for t in args.inputs]
    given = {} if args.top_k is None else {"top_k": args.top_k}
    with contextlib.redirect_stdout(sys.stderr):  # libraries' log lines (DeepSpeed's) must not corrupt the JSON
        predictions = predict_local(args.export_dir, inputs, **given)
    print(json.dumps(predictions, indent=2))
    return 0


def _is_image_export(export_dir: str) -> bool:
    from training.layout import read_export_info, resolve_export_dir

    return read_export_info(resolve_export_dir(export_dir)).task == "image-classification"


def _serve(args) -> int:
    from cluster.runtime import ray_session
    from serving import serve_exports

    with ray_session(args.address):
        serve_exports(args.exports, names=args.name, host=args.host, port=args.port, block=True)
    return 0
