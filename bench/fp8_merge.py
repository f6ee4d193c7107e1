"""Benchmark `loratools merge` into an FP8 block-scaled model against the same merge into its bfloat16 original.

A synthetic Llama-shaped model (hidden 2048, intermediate 5632, 32 heads / 4 KV heads, vocab 32000: TinyLlama's
shapes, as bench/merge.py) with enough layers for about --size-gb GB (1e9 bytes) in FP8 (17 layers ≈ 1.01 GB; the
same model in bfloat16 ≈ 1.76 GB) is written twice in one pass, shard by shard, one tensor in memory at a time:

  bf16   every tensor bfloat16 (N(0, 0.02²) weights, norms 1)
  fp8    the same bfloat16 tensors, every decoder linear weight (q, k, v, o, gate, up, down) quantized the
         DeepSeek-V3 / transformers way by ``loratools.quant.fp8.Fp8Format((128, 128)).quantize``: e4m3 ``weight``
         + float32 ``weight_scale_inv`` per 128×128 block, ``quantization_config`` {"quant_method": "fp8",
         "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}; embeddings, lm_head
         and norms stay bfloat16

The adapter: a PEFT LoRA r=16, alpha 32 on q, k, v, o of every layer, A ~ N(0, 0.01²), B ~ N(0, 0.005²), so ΔW
≈ 2 % of W (‖ΔW‖/‖W‖ of the first module is measured and reported). 2 %, not 1 %: at 1 % (B ~ N(0, 0.0025²)) the
keep-format merge keeps only 37 % of ΔW (e4m3 has 3 mantissa bits) and its erase guard (≥ 50 % kept) refuses it;
at 2 % it keeps ≈ 64 %.

Paths timed, each as a child process, alternating (cp, bf16, fp8 in even rounds; fp8, bf16, cp in odd ones),
a fresh output (deleted, then ``sync``) before each:
  cp          cp -r FP8 OUT (the floor: the FP8 model's bytes, in the page cache, written)
  merge-bf16  python -m loratools -q merge BF16 ADAPTER -o OUT --device cpu
  merge-fp8   python -m loratools -q merge FP8 ADAPTER -o OUT --device cpu   (default: keeps the FP8 format)
For each: median wall time, median CPU time (user + system) and median peak RSS (the child's ru_maxrss from
os.wait4; this parent imports no torch, the models are made in a child). Not a test: run it by hand.
Everything lives under --workdir (default /tmp/lt-bench-fp8), deleted at the end unless --keep.

    python bench/fp8_merge.py --size-gb 1 --runs 5 --json bench/results/fp8_merge.json   # the issue's figures
    python bench/fp8_merge.py --size-gb 0.1 --runs 1                                      # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import run_in_workdir, timed  # noqa: E402
from merge import HEADS, HIDDEN, INTER, KV, VOCAB, llama_shapes  # noqa: E402  (the bf16 bench's model)
BLOCK = 128
QCONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATHS = ("cp", "merge-bf16", "merge-fp8")
RANK, SIGMA_A, SIGMA_B = 16, 0.01, 0.005


def is_quantized(name: str) -> bool:
    return ".layers." in name and name.endswith(tuple(t + ".weight" for t in QUANTIZED))


def fp8_entries(name: str, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of what the FP8 model stores for one bfloat16 tensor."""
    if not is_quantized(name):
        return [(name, "BF16", shape)]
    return [(name, "F8_E4M3", shape), (name + "_scale_inv", "F32", (math.ceil(shape[0] / BLOCK),
                                                                    math.ceil(shape[1] / BLOCK)))]


def fp8_layer_bytes() -> int:
    per = {n: s for n, s in llama_shapes(1)}
    return sum(math.prod(s) * {"BF16": 2, "F8_E4M3": 1, "F32": 4}[d]
               for n, s in per.items() if ".layers." in n for _, d, s in fp8_entries(n, s))


def layers_for(size_gb: float) -> tuple[int, int]:
    """(layers, vocab) of an FP8 model of about ``size_gb`` GB, or of one layer and a smaller vocabulary."""
    head = 2 * 2 * VOCAB * HIDDEN + 2 * HIDDEN
    target = size_gb * 1e9
    if target >= head + fp8_layer_bytes():
        return max(1, round((target - head) / fp8_layer_bytes())), VOCAB
    return 1, max(256, int((target - fp8_layer_bytes()) / (4 * HIDDEN)))


class Sharded:
    """A model written as shards of at most ``shard_bytes``, planned up front, fed tensor by tensor in order."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], shard_bytes: int) -> None:
        from loratools.io import Entry

        self.path = path
        path.mkdir(parents=True)
        self.shards: list[list[Entry]] = [[]]
        size = 0
        for n, d, s in entries:
            e = Entry(n, d, s)
            if size + e.nbytes > shard_bytes and self.shards[-1]:
                self.shards.append([])
                size = 0
            self.shards[-1].append(e)
            size += e.nbytes
        self.files = [f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors" for i in range(len(self.shards))]
        self.first = {sh[0].name: i for i, sh in enumerate(self.shards)}
        self.writer = None

    def write(self, name: str, tensor: object) -> None:
        from loratools.io import ShardWriter

        if name in self.first:
            if self.writer is not None:
                self.writer.close()
            i = self.first[name]
            self.writer = ShardWriter(self.path / self.files[i], self.shards[i], {"format": "pt"})
        self.writer.write(name, tensor)  # type: ignore[union-attr]

    def finish(self, config: dict[str, object]) -> int:
        if self.writer is not None:
            self.writer.close()
        weight_map = {e.name: f for f, sh in zip(self.files, self.shards) for e in sh}
        total = sum(e.nbytes for sh in self.shards for e in sh)
        (self.path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (self.path / "config.json").write_text(json.dumps(config, indent=2))
        (self.path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        return total


def make_models(bf16: Path, fp8: Path, layers: int, vocab: int, shard_bytes: int) -> None:
    """Both models in one pass over the same random bfloat16 tensors (one in memory at a time)."""
    import torch

    from loratools.quant.fp8 import Fp8Format

    shapes = llama_shapes(layers, vocab)
    wb = Sharded(bf16, [(n, "BF16", s) for n, s in shapes], shard_bytes)
    wf = Sharded(fp8, [e for n, s in shapes for e in fp8_entries(n, s)], shard_bytes)
    fmt = Fp8Format((BLOCK, BLOCK))
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes:
        t = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        wb.write(name, t)
        if is_quantized(name):
            w, s = fmt.quantize(t)
            wf.write(name, w)
            wf.write(name + "_scale_inv", s)
        else:
            wf.write(name, t)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV,
              "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2}
    wb.finish(config)
    wf.finish({**config, "quantization_config": QCONFIG})


def make_adapter(path: Path, layers: int, vocab: int) -> float:
    """The PEFT LoRA r=16 on q, k, v, o; returns ‖ΔW‖/‖W‖ of its first module (W ~ N(0, 0.02²))."""
    import torch

    from loratools import Adapter, AdapterConfig, Module, write_adapter

    g = torch.Generator().manual_seed(1)
    mods = {}
    for name, shape in llama_shapes(layers, vocab):
        if ".layers." in name and name.endswith(tuple(t + ".weight" for t in TARGETS)):
            out, inp = shape
            mods[name[: -len(".weight")]] = Module(A=torch.randn(RANK, inp, generator=g) * SIGMA_A,
                                                  B=torch.randn(out, RANK, generator=g) * SIGMA_B,
                                                  alpha=2 * RANK, scale=2.0)
    first = next(iter(mods.values()))
    ratio = float((2.0 * first.B @ first.A).norm() / (0.02 * math.sqrt(first.B.shape[0] * first.A.shape[1])))
    cfg = AdapterConfig(target_modules=TARGETS, task_type="CAUSAL_LM", base_model=None)
    write_adapter(Adapter(mods, cfg), path, format="peft")
    return ratio


def _model_info(path: Path) -> dict[str, object]:
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    return {"bytes": idx["metadata"]["total_size"], "shards": len(set(idx["weight_map"].values()))}


def bench(work: Path, size_gb: float, runs: int, shard_mb: int) -> dict[str, object]:
    layers, vocab = layers_for(size_gb)
    bf16, fp8, adapter = work / "bf16", work / "fp8", work / "adapter"
    subprocess.run([sys.executable, __file__, "--make", str(bf16), str(fp8), str(adapter), str(layers), str(vocab),
                    str(shard_mb)], check=True)
    made = json.loads((work / "made.json").read_text())
    res: dict[str, object] = {"size_gb": size_gb, "layers": layers, "vocab": vocab, "bf16": _model_info(bf16),
                              "fp8": _model_info(fp8), "adapter": {"rank": RANK, "targets": list(TARGETS),
                                                                   "delta_rel_first_module": made["delta_rel"]}}
    for m in (bf16, fp8):  # into the page cache, as after a download
        subprocess.run(["cat", *map(str, m.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)
    py = sys.executable
    lt = [py, "-m", "loratools", "-q", "merge"]
    out = work / "out"
    cmds = {"cp": ["cp", "-r", str(fp8), str(out)],
            "merge-bf16": [*lt, str(bf16), str(adapter), "-o", str(out), "--device", "cpu"],
            "merge-fp8": [*lt, str(fp8), str(adapter), "-o", str(out), "--device", "cpu"]}
    samples: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
    for i in range(runs):
        for path in PATHS if i % 2 == 0 else PATHS[::-1]:
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            load = os.getloadavg()[0]
            s = timed(cmds[path])
            s["load1_before"] = load
            s["round"] = i + 1
            if path == "merge-fp8" and i == 0:  # what the keep-format merge wrote, once
                cfg = json.loads((out / "config.json").read_text())
                res["fp8_out"] = {**_model_info(out), "quantization_config": cfg.get("quantization_config")}
            samples[path].append(s)
            print(f"  round {i + 1} {path}: {s['wall_s']:.2f} s wall, {s['cpu_s']:.2f} s CPU, "
                  f"{s['rss_mb']:.0f} MB (load {load:.1f})", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    for path, ss in samples.items():
        res[path] = {k: statistics.median(x[k] for x in ss) for k in ("wall_s", "cpu_s", "rss_mb")}
        res[path]["runs"] = ss  # type: ignore[index]
    res["fp8_over_bf16_wall"] = res["merge-fp8"]["wall_s"] / res["merge-bf16"]["wall_s"]  # type: ignore[index]
    res["fp8_over_bf16_wall_per_round"] = [f["wall_s"] / b["wall_s"]
                                           for f, b in zip(samples["merge-fp8"], samples["merge-bf16"])]
    return res


def table(r: dict[str, object]) -> str:
    names = {"cp": "cp -r (FP8 model)", "merge-bf16": "merge, bf16 base", "merge-fp8": "merge, FP8 base (kept FP8)"}
    sizes = {"cp": r["fp8"], "merge-bf16": r["bf16"], "merge-fp8": r["fp8"]}
    cp = r["cp"]["wall_s"]  # type: ignore[index]
    lines = [f"{r['layers']} layers; ‖ΔW‖/‖W‖ = {r['adapter']['delta_rel_first_module']:.4f}",  # type: ignore[index]
             "", "| path | model | wall (median) | CPU (median) | peak RSS (median) | wall / cp | runs (wall, s) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for p in PATHS:
        m, sz = r[p], sizes[p]
        runs = " / ".join(f"{x['wall_s']:.2f}" for x in m["runs"])  # type: ignore[index]
        lines.append(f"| {names[p]} | {sz['bytes'] / 1e9:.2f} GB, {sz['shards']} shards | {m['wall_s']:.2f} s | "  # type: ignore[index]
                     f"{m['cpu_s']:.2f} s | {m['rss_mb']:.0f} MB | {m['wall_s'] / cp:.2f}× | {runs} |")  # type: ignore[index]
    per = " / ".join(f"{x:.2f}" for x in r["fp8_over_bf16_wall_per_round"])  # type: ignore[union-attr]
    lines.append(f"\nFP8 / bf16 merge wall: {r['fp8_over_bf16_wall']:.2f}× (medians); per round {per}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="the FP8 model's size in GB (1e9 bytes)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--shard-mb", type=int, default=500, help="shard size (500 MB: 3 FP8 / 4 bf16 shards at 1 GB)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lt-bench-fp8"))
    ap.add_argument("--json", type=Path, help="also write the JSON here (bench/results/fp8_merge.json)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--make", nargs=6, metavar=("BF16", "FP8", "ADAPTER", "LAYERS", "VOCAB", "SHARD_MB"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        bf16, fp8, adapter = (Path(x) for x in args.make[:3])
        layers, vocab, shard_mb = (int(x) for x in args.make[3:])
        make_models(bf16, fp8, layers, vocab, shard_mb * 1_000_000)
        ratio = make_adapter(adapter, layers, vocab)
        (bf16.parent / "made.json").write_text(json.dumps({"delta_rel": ratio}))
        return
    command = " ".join(["python", "bench/fp8_merge.py", *sys.argv[1:]])
    run_in_workdir(args.workdir, args.keep, lambda: {"command": command, **bench(args.workdir, args.size_gb,
                                                                                  args.runs, args.shard_mb)},
                   table, "result", json_path=args.json)


if __name__ == "__main__":
    main()
