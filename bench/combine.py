"""Benchmark: combining three rank-64 adapters shaped like a 7B Llama into one rank-64 adapter.

Inputs: three LoRA adapters on 32 blocks × 7 projections (q, k, v, o 4096×4096; gate, up
11008×4096; down 4096×11008), rank 64, alpha 128 (scale 2), float32, weights 1, 0.7, −0.4.
Each factor pair has a power-law spectrum: ``B = G_B diag(1/j) / √m``, ``A = G_A / √n``
(G Gaussian, j = 1…64), different per adapter and module.

Routes, each in its own child process (so each one's peak memory is its own):

- ``factor``: :func:`loratools.combine_adapters` with ``RankRule(rank=64)`` — stacked factors,
  Gram/QR of the m×192 and 192×n stacks, SVD of the 192×192 core; ΔW is never formed. Timed on the
  whole model (224 modules) and on the three sample modules (q_proj, gate_proj, down_proj of block 0).
- ``dense``: form ΔW = Σ wᵢsᵢBᵢAᵢ in float32, ``torch.linalg.svd(ΔW, full_matrices=False)``, keep 64
  triplets — on the sample modules only (minutes per module on this machine), per-module times.
- ``peft``: peft's ``add_weighted_adapter(combination_type="svd", svd_rank=64)`` (defaults otherwise:
  ``svd_full_matrices=True``) on a one-Linear model per sample module holding the three adapters.

Error: ``‖T − B'A'‖_F / ‖T‖_F`` in float64 against the exact sum T, beside the float64 Eckart–Young
optimum ``√(Σ_{i>64}σᵢ²)/‖σ‖`` (σ from the float64 QR route of :func:`loratools.linalg.lowrank_svd`).
Peak memory: the largest RSS sampled every 2 ms while the route runs, minus the RSS just before it
(the inputs are already in memory).

Usage: python bench/combine.py [--runs 3] [--threads 1] [--routes factor,dense,peft] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
SAMPLE = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"]
LAYERS, RANK, WEIGHTS = 32, 64, (1.0, 0.7, -0.4)


def _name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{'mlp' if proj in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{proj}"


def build_inputs(names: list[str]):
    import torch

    from loratools.adapter import Adapter, Module

    spectrum = 1.0 / torch.arange(1, RANK + 1, dtype=torch.float32)
    adapters = []
    for i in range(len(WEIGHTS)):
        mods = {}
        for name in names:
            layer, proj = int(name.split(".")[2]), name.rsplit(".", 1)[1]
            m, n = SHAPES[proj]
            # seeded by (adapter, layer, projection): every route sees the same factors for a module
            g = torch.Generator().manual_seed(10_000 * i + 10 * layer + list(SHAPES).index(proj))
            B = torch.randn(m, RANK, generator=g) * spectrum / m**0.5
            A = torch.randn(RANK, n, generator=g) / n**0.5
            mods[name] = Module(A=A, B=B, alpha=2.0 * RANK, scale=2.0)
        adapters.append(Adapter(mods))
    return adapters


class PeakRSS:
    """Largest resident set size sampled every 2 ms while the block runs, minus the RSS at its start (MiB)."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())
        self.mib = (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def errors(adapters, name: str, B_out, A_out) -> tuple[float, float]:
    """(relative error of B_out @ A_out against the exact sum, the float64 Eckart–Young optimum at RANK)."""
    import torch

    from loratools.linalg import lowrank_svd

    Bs, As = [], []
    for a, w in zip(adapters, WEIGHTS):
        B, A = a.modules[name].factors(dtype=torch.float64)
        Bs.append(B)
        As.append(w * A)
    B64, A64 = torch.cat(Bs, 1), torch.cat(As, 0)
    S = lowrank_svd(B64, A64)[1]
    opt = float(S[RANK:].square().sum().sqrt() / S.square().sum().sqrt())
    T = B64 @ A64
    err = float((T - B_out.double() @ A_out.double()).norm() / T.norm())
    return err, opt


def worker_factor(runs: int) -> dict:
    import torch

    from loratools.compress.combine import combine_adapters
    from loratools.linalg import RankRule

    names = [_name(layer, p) for layer in range(LAYERS) for p in SHAPES]
    adapters = build_inputs(names)
    pairs = list(zip(adapters, WEIGHTS))
    rule = RankRule(rank=RANK)
    times, peaks = [], []
    res = None
    for _ in range(runs):
        with PeakRSS() as mem:
            t = time.perf_counter()
            res = combine_adapters(pairs, rule=rule, device="cpu")
            times.append(time.perf_counter() - t)
        peaks.append(mem.mib)
        del mem
    sample = {}
    for name in SAMPLE:
        sub = [(a.with_modules({name: a.modules[name]}), w) for a, w in pairs]
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            combine_adapters(sub, rule=rule, device="cpu")
            ts.append(time.perf_counter() - t)
        B, A = res.adapter.modules[name].factors(dtype=torch.float64)
        err, opt = errors(adapters, name, B, A)
        sample[name] = {"times": ts, "err": err, "opt": opt}
    return {"route": "factor", "modules": len(names), "times": times, "peak_mib": peaks, "sample": sample}


def worker_dense(runs: int) -> dict:
    import torch

    adapters = build_inputs(SAMPLE)
    sample = {}
    for name in SAMPLE:
        ts, peaks = [], []
        for _ in range(runs):
            with PeakRSS() as mem:
                t = time.perf_counter()
                mods = [a.modules[name] for a in adapters]
                T = sum(w * m.scale * (m.B @ m.A) for m, w in zip(mods, WEIGHTS))
                U, S, Vh = torch.linalg.svd(T, full_matrices=False)
                B, A = U[:, :RANK] * S[:RANK], Vh[:RANK]
                del T, U, S, Vh
                ts.append(time.perf_counter() - t)
            peaks.append(mem.mib)
        err, opt = errors(adapters, name, B, A)
        sample[name] = {"times": ts, "peak_mib": peaks, "err": err, "opt": opt}
    return {"route": "dense", "sample": sample}


def worker_peft(runs: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    adapters = build_inputs(SAMPLE)
    sample = {}
    for name in SAMPLE:
        m, n = SHAPES[name.rsplit(".", 1)[1]]
        ts, peaks = [], []
        for run in range(runs):
            base = torch.nn.Sequential()
            base.add_module("proj", torch.nn.Linear(n, m, bias=False))
            cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"])
            model = get_peft_model(base, cfg, adapter_name="a0")
            for i in (1, 2):
                model.add_adapter(f"a{i}", cfg)
            layer = model.base_model.model.proj
            with torch.no_grad():
                for i, a in enumerate(adapters):
                    layer.lora_A[f"a{i}"].weight.copy_(a.modules[name].A)
                    layer.lora_B[f"a{i}"].weight.copy_(a.modules[name].B)
            with PeakRSS() as mem:
                t = time.perf_counter()
                model.add_weighted_adapter(["a0", "a1", "a2"], list(WEIGHTS), "svd", combination_type="svd",
                                           svd_rank=RANK)
                ts.append(time.perf_counter() - t)
            peaks.append(mem.mib)
            B = layer.lora_B["svd"].weight.detach() * layer.scaling["svd"]
            A = layer.lora_A["svd"].weight.detach()
            del model, base, layer
        err, opt = errors(adapters, name, B, A)
        sample[name] = {"times": ts, "peak_mib": peaks, "err": err, "opt": opt}
    return {"route": "peft", "sample": sample}


def run_worker(route: str, runs: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", route, "--runs", str(runs), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"{route} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict]) -> str:
    med = statistics.median
    lines = ["| module (shape) | route | time per module (median) | peak RSS above inputs | rel. error | "
             "float64 optimum | vs optimum |", "|---|---|---|---|---|---|---|"]
    count = {"q_proj": 128, "gate_proj": 64, "down_proj": 32}  # q,k,v,o ×32; gate,up ×32; down ×32
    totals: dict[str, float] = {}
    for name in SAMPLE:
        proj = name.rsplit(".", 1)[1]
        shape = "×".join(map(str, SHAPES[proj]))
        for route, res in results.items():
            s = res["sample"][name]
            peak = max(s["peak_mib"]) if "peak_mib" in s else max(res["peak_mib"])
            t = med(s["times"])
            totals[route] = totals.get(route, 0.0) + count[proj] * t
            lines.append(f"| {proj} ({shape}) | {route} | {t:.3g} s | {peak:.0f} MiB"
                         f"{' (whole model)' if 'peak_mib' not in s else ''} | {s['err']:.6f} | {s['opt']:.6f} | "
                         f"{100 * (s['err'] / s['opt'] - 1):+.4f} % |")
    lines.append("")
    for route, total in totals.items():
        lines.append(f"- {route}: whole model (224 modules) extrapolated from the per-module medians: {total:.0f} s")
    if "factor" in results:
        f = results["factor"]
        lines.append(f"- factor: whole model measured: {med(f['times']):.1f} s median of {len(f['times'])} "
                     f"({', '.join(f'{t:.1f}' for t in f['times'])} s), peak RSS above inputs "
                     f"{max(f['peak_mib']):.0f} MiB")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of the factor route (whole model and sample)")
    ap.add_argument("--dense-runs", type=int, default=1, help="runs of the dense and peft routes per module")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--routes", default="factor,dense,peft")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        fn = {"factor": worker_factor, "dense": worker_dense, "peft": worker_peft}[args.worker]
        print(json.dumps(fn(args.runs)))
        return
    import platform

    import torch

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} threads; load average {os.getloadavg()}", flush=True)
    results = {}
    for route in args.routes.split(","):
        t = time.perf_counter()
        results[route] = run_worker(route, args.runs if route == "factor" else args.dense_runs, args.threads)
        print(f"{route}: done in {time.perf_counter() - t:.0f} s; load average {os.getloadavg()}", flush=True)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
