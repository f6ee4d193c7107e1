"""Are `train`'s short-run learning rates right? (issue "The practitioner's workflow", point 2)

Model: SmolLM2-135M-Instruct (see bench/common.py). Data: gensim's `pang_lee_polarity.cor` (200 movie-review
sentences labelled `__label__pos`/`__label__neg`), shuffled with seed 0 and split into 150 training and 50
held-out sentences, written as prompt/completion rows:

    {"prompt": "Review: <sentence>\\nSentiment:", "completion": " positive"}

Each run trains with `loratools.train` (the defaults except the ones named) for --steps steps on the
150 rows, the 50 held-out rows as `eval_file`. Reported per run: the held-out loss (token-mean cross-entropy
of the completion and its EOS, what `train` reports) and the accuracy of the label chosen by the model:
the one of " positive"/" negative" whose continuation (with EOS) has the lower summed loss after the prompt.
The base model's figures come first.

    python bench/defaults_check.py --steps 50 --json bench/results/defaults_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import _package_dir, machine, smollm_dir  # noqa: E402

from loratools.lm.data import IGNORE, Row, row_example  # noqa: E402
from loratools.lm.load import load_causal_lm  # noqa: E402
from loratools.nn.inject import load_adapter  # noqa: E402
from loratools.train import TrainConfig, train_adapter  # noqa: E402

LABELS = {"__label__pos": " positive", "__label__neg": " negative"}
RUNS = [("LoRA r=8", dict(method="lora", rank=8), 2e-4), ("LoRA r=8", dict(method="lora", rank=8), 1e-3),
        ("AdaLoRA 12→4", dict(method="adalora"), 1e-3), ("AdaLoRA 12→4", dict(method="adalora"), 5e-3)]


def sentences() -> list[tuple[str, str]]:
    """(prompt, completion) per labelled sentence, shuffled with seed 0."""
    path = _package_dir("gensim") / "test" / "test_data" / "pang_lee_polarity.cor"
    rows = []
    text = path.read_text(encoding="cp1252", errors="replace")  # not UTF-8: it has cp1252 dashes (0x97)
    for line in text.splitlines():
        label, _, text = line.strip().partition(" ")
        if label in LABELS:
            rows.append((f"Review: {text}\nSentiment:", LABELS[label]))
    random.Random(0).shuffle(rows)
    return rows


def write_jsonl(rows: list[tuple[str, str]], path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return path


def accuracy(model: torch.nn.Module, tok, rows: list[tuple[str, str]]) -> float:
    """Fraction of rows whose true label's continuation has the lower summed loss of the two labels."""
    right = 0
    with torch.no_grad():
        for prompt, truth in rows:
            cost = {}
            for c in LABELS.values():
                ex = row_example(tok, Row(prompt, c), seq_len=128)
                ids, labels = torch.tensor([ex.input_ids]), torch.tensor(ex.labels)
                logits = model(input_ids=ids).logits[0, :-1]
                keep = labels[1:] != IGNORE
                cost[c] = float(F.cross_entropy(logits[keep], labels[1:][keep], reduction="sum"))
            right += min(cost, key=cost.__getitem__) == truth
    return right / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = smollm_dir()
    rows = sentences()
    tmp = Path(tempfile.mkdtemp())
    train_file, held_file = write_jsonl(rows[:150], tmp / "train.jsonl"), write_jsonl(rows[150:], tmp / "held.jsonl")
    model, tok = load_causal_lm(base, frozen=True)
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "steps": args.steps, "base_accuracy": accuracy(model, tok, rows[150:]), "runs": []}
    for label, spec, lr in RUNS:
        t = time.perf_counter()
        cfg = TrainConfig(**spec, steps=args.steps, lr=lr, eval_file=str(held_file), eval_every=args.steps,
                          seed=0, device="cpu")
        res = train_adapter(base, train_file, tmp / f"run{len(results['runs'])}", cfg)
        tuned = copy.deepcopy(model)
        load_adapter(tuned, res.adapter)
        row = {"run": label, "lr": lr, "base_heldout_loss": res.evals[0]["eval_loss"],
               "heldout_loss": res.evals[-1]["eval_loss"], "accuracy": accuracy(tuned, tok, rows[150:]),
               "train_loss_last5": sum(x["loss"] for x in res.losses[-5:]) / 5,
               "seconds": round(time.perf_counter() - t, 1)}
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"base accuracy {results['base_accuracy']:.2f}; {machine()}")


if __name__ == "__main__":
    main()
