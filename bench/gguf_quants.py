"""Benchmark loratools.gguf.quants: MB/s of float32 input, one core, beside gguf.quants and llama.cpp.

For each type: loratools' `quantize` (the K-quants in numpy; the rest delegated to the gguf
package plus loratools' checks), the gguf package's own `quantize` where it has one, and llama.cpp's
`ggml_quantize_chunk` (the C reference quantizers, built by `make llama-ref`; skipped if absent).
CPU seconds (`time.process_time`, so other processes on a shared machine count less), best of N;
the relative error ‖x̂ − x‖/‖x‖ of N(0, 1) weights against their float64 originals.

    OMP_NUM_THREADS=1 python bench/gguf_quants.py [--rows 1024] [--cols 4096] [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import gguf  # noqa: E402
from ggml_ref import load  # noqa: E402

from loratools.gguf import quants as gq  # noqa: E402

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _best(fn, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    x64 = np.random.default_rng(0).standard_normal((a.rows, a.cols))
    x = x64.astype(np.float32)
    mb = x.nbytes / 1e6
    ggml = load()
    print(f"input {a.rows}×{a.cols} float32 ({mb:.1f} MB); CPU seconds, best of {a.runs}")
    print("| type | loratools MB/s | gguf.quants MB/s | llama.cpp (C) MB/s | bytes = llama.cpp | rel. error |")
    print("|---|---|---|---|---|---|")
    for name in TYPES:
        t = gguf.GGMLQuantizationType[name]
        ours = _best(lambda: gq.quantize(x, name), a.runs)
        theirs = "—"
        if name not in gq.K_QUANTS:
            theirs = f"{mb / _best(lambda: gguf.quants.quantize(x, t), a.runs):.0f}"
        c, same = "—", "—"
        if ggml is not None:
            c = f"{mb / _best(lambda: ggml.quantize(x, int(t)), a.runs):.0f}"
            same = "yes" if np.array_equal(gq.quantize(x, name), ggml.quantize(x, int(t))) else "NO"
        y = gq.dequantize(gq.quantize(x, name), name, x.shape).astype(np.float64)
        err = np.linalg.norm(y - x64) / np.linalg.norm(x64)
        print(f"| {name} | {mb / ours:.1f} | {theirs} | {c} | {same} | {err:.4f} |", flush=True)


if __name__ == "__main__":
    main()
