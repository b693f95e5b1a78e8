"""`tunefleet predict | serve | serve add`: using exported models."""

from __future__ import annotations

import base64
import contextlib
import json
import sys
from pathlib import Path


DTYPE_OPTION = dict(
    choices=["auto", "float32", "bfloat16", "float16", "int8"], default="auto",
    help="the model's dtype (serve.dtype): auto is bfloat16 where the hardware multiplies it natively, else float32; "
         "int8 quantizes Linear layers (CPU only, faster, labels can move); float32 gives the training run's exact scores")


def register(commands) -> None:
    predict = commands.add_parser("predict", help="predict with an export, without a server; prints JSON")
    predict.add_argument("export_dir", help="export directory (or a run directory holding export/)")
    predict.add_argument("inputs", nargs="+",
                         help="texts ('first ||| second' gives a sentence pair), or image files for an image model")
    predict.add_argument("--top-k", type=int, default=None, help="labels per input (default: the task's default)")
    predict.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                         help="a request parameter, as the HTTP API's \"parameters\" take it (the value is YAML), "
                              "e.g. --param max_new_tokens=32 --param temperature=0.7 for a causal LM; repeatable")
    predict.add_argument("--dtype", **DTYPE_OPTION)
    predict.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                         help="where the model runs: auto is the GPU when CUDA is available, else the CPU")
    predict.set_defaults(handler=_predict)

    serve = commands.add_parser(
        "serve", help="serve exports over HTTP with Ray Serve until SIGINT/SIGTERM; `serve add` registers an adapter",
        usage="tunefleet serve [EXPORT ...] [--file SERVE_FILE] [--build [--out FILE]] [options]\n"
              "       tunefleet serve add RUN_OR_EXPORT --endpoint URL [--name NAME]",
        description="Serve exports (full models get their own replicas; adapters over one base share a pool of "
                    "base-model replicas), from the command line or a serve file (YAML: docs/serving.md). "
                    "`serve add` registers a finished run's adapter with a running endpoint, without a redeploy.")
    serve.add_argument("exports", nargs="*", metavar="EXPORT",
                       help="export directories, run directories or storage URIs (or: add RUN_OR_EXPORT)")
    serve.add_argument("--file", "-f", help="serve file (YAML) listing models, routes, replicas, batching, pools")
    serve.add_argument("--name", action="append", default=None,
                       help="model name per export (default: the job name); with `add`: the registered name")
    serve.add_argument("--build", action="store_true",
                       help="write a Ray Serve config (for `serve deploy` or a KubeRay RayService) instead of serving")
    serve.add_argument("--out", help="with --build: the config file to write (default: print it)")
    serve.add_argument("--host", default=None,
                       help="bind address (default 127.0.0.1: this machine only; 0.0.0.0 in a --build config)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--address", help="Ray cluster address (default: a private local Ray)")
    serve.add_argument("--dtype", **DTYPE_OPTION)
    serve.add_argument("--endpoint", help="with `add`: the running endpoint's URL, e.g. http://127.0.0.1:8000")
    serve.add_argument("--token-env", default="TUNEFLEET_TOKEN",
                       help="with `add`: environment variable holding the endpoint's bearer token, if it has one "
                            "(default TUNEFLEET_TOKEN)")
    serve.set_defaults(handler=_serve)


def _predict(args) -> int:
    from serving import ServingError, predict_local
    from serving.config import ServeSpec

    import torch

    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU is visible here; use --device cpu or auto", file=sys.stderr)
        return 2
    try:  # ServeSpec's own rules for a replica: no float16 on a CPU, no int8 on a GPU
        spec = ServeSpec(dtype=args.dtype, num_gpus=1 if on_gpu else 0)
    except ValueError as err:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in getattr(err, "errors", list)())
        print(f"error: --dtype {args.dtype} (predict runs on the {'GPU' if on_gpu else 'CPU'} here): "
              f"{problems or err}", file=sys.stderr)
        return 2
    from cluster.spec import JobSpecError, parse_overrides

    try:
        parameters = {".".join(key): value for key, value in parse_overrides(args.param)}
    except JobSpecError as err:
        print(f"error: --param {', '.join(str(p.value) for p in err.problems)}: expected KEY=VALUE", file=sys.stderr)
        return 2
    given = {} if args.top_k is None else {"top_k": args.top_k}
    try:
        if _is_image_export(args.export_dir):  # image files → base64, as an HTTP client sends them
            inputs = [base64.b64encode(_image_bytes(name, i)).decode() for i, name in enumerate(args.inputs)]
        else:
            inputs = [{"text": t.split("|||")[0].strip(), "text_pair": t.split("|||")[1].strip()} if "|||" in t
                      else t for t in args.inputs]
        with contextlib.redirect_stdout(sys.stderr):  # libraries' log lines (DeepSpeed's) must not corrupt the JSON
            predictions = predict_local(args.export_dir, inputs, parameters=parameters, spec=spec, **given)
    except (OSError, ValueError, ServingError) as err:  # no such export or image file, an input past a limit
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, ServingError) and isinstance(err.detail, dict) and err.detail.get("text_pairs"):
            print("  (here, 'first ||| second' is one sentence pair)", file=sys.stderr)
        return 2
    print(json.dumps(predictions, indent=2))
    return 0


def _image_bytes(name: str, index: int) -> bytes:
    path = Path(name)
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "is not a file"
        raise ValueError(f"inputs[{index}] {name!r} {why}: this export classifies images, so each input is the "
                         "path of an image file")
    return path.read_bytes()


def _is_image_export(export_dir: str) -> bool:
    from training.layout import read_export_info, resolve_export_dir

    return read_export_info(resolve_export_dir(export_dir)).task == "image-classification"


def _serve(args) -> int:
    from serving.plan import PlanError

    if args.exports[:1] == ["add"]:
        return _serve_add(args)
    if args.endpoint:
        print("error: --endpoint goes with `tunefleet serve add RUN_OR_EXPORT --endpoint URL`", file=sys.stderr)
        return 2
    if bool(args.exports) == bool(args.file):
        print("error: give export directories or --file SERVE_FILE (one of the two)", file=sys.stderr)
        return 2
    try:
        plan = _plan(args)
    except (PlanError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.build:
        return _build(args, plan)

    from cluster.runtime import ray_session
    from serving import serve_exports

    with ray_session(args.address):
        serve_exports(host=args.host or "127.0.0.1", port=args.port, block=True, plan=plan)
    return 0


def _plan(args):
    if args.file:
        if args.name:
            raise ValueError("--name names command-line exports; a serve file names its models itself")
        if args.dtype != "auto":
            raise ValueError("--dtype sets command-line exports' dtype; in a serve file set serve.dtype (defaults: "
                             "or per model)")
        from serving.servefile import load_serve_file

        return load_serve_file(args.file, fetch=not args.build)
    from serving.plan import ModelRequest, make_plan

    if args.name is not None and len(args.name) != len(args.exports):
        raise ValueError(f"got {len(args.name)} --name for {len(args.exports)} exports; give one name per export")
    requests = [ModelRequest(export=e, name=args.name[i] if args.name else None, where=f"exports[{i}] ({e})")
                for i, e in enumerate(args.exports)]
    from serving.config import ServeSpec

    return make_plan(requests, spec=ServeSpec(dtype=args.dtype), fetch=not args.build)


def _build(args, plan) -> int:
    import yaml

    from serving.deploy import deploy_config

    config = deploy_config(plan, host=args.host or "0.0.0.0", port=args.port)
    text = ("# Ray Serve config written by `tunefleet serve --build`: serve deploy FILE, or a RayService's "
            "serveConfigV2.\n" + yaml.safe_dump(config, sort_keys=False))
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}: {len(config['applications'])} applications", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def _serve_add(args) -> int:
    import os

    if len(args.exports) != 2 or not args.endpoint:
        print("error: usage: tunefleet serve add RUN_OR_EXPORT --endpoint URL [--name NAME]", file=sys.stderr)
        return 2
    if args.name and len(args.name) > 1:
        print("error: `serve add` registers one export: give --name once", file=sys.stderr)
        return 2
    from serving.client import RegistrationError, register_export

    try:
        payload = register_export(args.endpoint, args.exports[1], args.name[0] if args.name else None,
                                  os.environ.get(args.token_env or ""))
    except RegistrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(payload, indent=2))
    return 0
