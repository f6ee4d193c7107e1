"""Benchmark: LoRA extraction (randomized vs exact SVD, and mergekit's) and resize.

Synthetic deltas shaped like a 7B model's projections, with a fine-tune-like
spectrum: ΔW = U diag(σ) Vᵀ + noise, σᵢ = σ₁/i for i ≤ K (U, V random
orthonormal, K = 512), plus Gaussian noise of Frobenius norm ``noise``·‖σ‖.

For each shape and rank this measures, in the same run:

- ``randomized``: :func:`loratools.linalg.truncated_svd` (Halko et al. range finder,
  ``power_iters`` = 3, oversample 10) — wall time, median of ``--runs``;
- ``exact``: ``torch.linalg.svd`` then truncation — wall time (it does not depend on the rank);
- ``mergekit`` (when importable): mergekit's own per-tensor decomposition
  ``TaskVectorDecompositionTask.execute`` on the same ΔW;
- the relative error ``‖ΔW − BA‖_F/‖ΔW‖_F`` of each, against the Eckart–Young optimum
  ``√(Σ_{i>r}σᵢ²)/‖ΔW‖_F`` from the exact SVD.

Then ``resize``: a rank-64 bf16 PEFT adapter on ``--layers`` 7B-shaped blocks (q,k,v,o
4096², gate/up 11008×4096, down 4096×11008) is written, read back (median of runs) and
resized to rank 16 (median of runs), reading excluded.

Usage: python bench/extract.py [--runs 5] [--exact-runs 1] [--threads 1] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loratools.adapter import Adapter, Module  # noqa: E402
from loratools.config import AdapterConfig  # noqa: E402
from loratools.formats import read_adapter, write_adapter  # noqa: E402
from loratools.linalg import sqrt_split, truncated_svd  # noqa: E402
from loratools.compress.resize import resize_adapter  # noqa: E402


def synthetic_delta(m: int, n: int, *, k: int = 512, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    D = (U * s) @ V.T
    E = torch.randn(m, n, generator=g)
    return D + E * (noise * float(s.norm()) / float(E.norm()))


def rel_err(M: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    return float((M - B @ A).norm() / M.norm())


def timed(fn, runs: int):
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def mergekit_decompose():
    try:
        from mergekit.scripts.extract_lora import TaskVectorDecompositionTask
    except Exception:  # not installed: the table says so
        return None

    def run(M: torch.Tensor, r: int):
        # mergekit's own task body, called on the same tensor (its CLI needs a whole model on disk)
        task = SimpleNamespace(transpose=False, max_rank=r, sv_epsilon=0, distribute_scale=True)
        a, b = TaskVectorDecompositionTask.execute(task, M)
        return b, a
    return run


def bench_extract(shapes, ranks, runs: int, exact_runs: int):
    mk = mergekit_decompose()
    rows = []
    for m, n in shapes:
        M = synthetic_delta(m, n)
        t_exact, t_exact_all, (U, S, Vh) = timed(lambda: torch.linalg.svd(M, full_matrices=False), exact_runs)
        for r in ranks:
            optimum = float(S[r:].double().square().sum().sqrt() / S.double().norm())
            gen = torch.Generator().manual_seed(1)
            t_rand, t_rand_all, (Ur, Sr, Vr, method) = timed(lambda: truncated_svd(M, rank=r, generator=gen), runs)
            Br, Ar = sqrt_split(Ur, Sr, Vr)
            Be, Ae = sqrt_split(U[:, :r], S[:r], Vh[:r])
            row = {
                "shape": [m, n], "rank": r, "method": method,
                "randomized_s": t_rand, "randomized_runs": t_rand_all,
                "exact_s": t_exact, "exact_runs": t_exact_all,
                "speedup": t_exact / t_rand,
                "optimum": optimum, "randomized_err": rel_err(M, Br, Ar), "exact_err": rel_err(M, Be, Ae),
            }
            row["randomized_vs_optimum"] = row["randomized_err"] / optimum - 1
            if mk is not None and r == ranks[0]:
                t_mk, t_mk_all, (Bm, Am) = timed(lambda: mk(M, r), exact_runs)
                row.update(mergekit_s=t_mk, mergekit_runs=t_mk_all, mergekit_err=rel_err(M, Bm, Am))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del M, U, S, Vh
    return rows, mk is not None


def bench_resize(layers: int, runs: int, shapes_7b: bool = True):
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
              "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
              "mlp.down_proj": (4096, 11008)}
    if not shapes_7b:
        shapes = {k: (v[0] // 4, v[1] // 4) for k, v in shapes.items()}
    mods = {}
    for i in range(layers):
        for k, (o, n) in shapes.items():
            A = (torch.randn(64, n, generator=g) / n**0.5).bfloat16()
            B = (torch.randn(o, 64, generator=g) * 0.01).bfloat16()
            mods[f"model.layers.{i}.{k}"] = Module(A=A, B=B, alpha=64.0, scale=1.0)
    adapter = Adapter(mods, AdapterConfig())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "a"
        write_adapter(adapter, path)
        size = sum(f.stat().st_size for f in path.iterdir())
        t_read, t_read_all, loaded = timed(lambda: read_adapter(path), runs)
        t_resize, t_resize_all, res = timed(lambda: resize_adapter(loaded, rank=16), runs)
    row = {"layers": layers, "modules": len(mods), "file_bytes": size, "read_s": t_read, "read_runs": t_read_all,
           "resize_s": t_resize, "resize_runs": t_resize_all, "ratio_to_two_reads": t_resize / (2 * t_read)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--exact-runs", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1024×1024 and 1024×2752 instead of 7B shapes")
    ap.add_argument("--skip-extract", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(1024, 1024), (1024, 2752)] if args.quick else [(4096, 4096), (4096, 11008)]
    info = {"machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, "
                       f"torch {torch.__version__}, {torch.get_num_threads()} threads",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg()}
    print(json.dumps(info), flush=True)
    rows, has_mk = ([], False) if args.skip_extract else bench_extract(shapes, [16, 64], args.runs, args.exact_runs)
    rs = bench_resize(args.layers, args.runs, shapes_7b=not args.quick)
    info.update(loadavg_end=os.getloadavg(), mergekit=has_mk, extract=rows, resize=rs)
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
