"""Benchmark `loratools merge` against its floor (`cp`) and peft's merge_and_unload + save_pretrained.

A synthetic Llama-shaped model in bfloat16 (hidden 2048, intermediate 5632, 32 heads / 4 KV heads,
vocab 32000: TinyLlama's shapes; 22 layers ≈ 2.2 GB, 44 layers ≈ 4.1 GB) is written in 500 MB shards
with an index, and a PEFT LoRA r=16 on q,k,v,o,gate,up,down of every layer. Each tool runs as a child
process; wall time is measured around it and peak RSS is that child's own ru_maxrss (os.wait4).
Not a test: run it by hand. Everything lives under --workdir (default /tmp/lt-bench) and is deleted
at the end unless --keep.

    python bench/merge.py --layers 22 44 --runs 3 --peft-runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# This process stays small (no torch): Linux keeps a process's peak RSS across fork+exec, so a fat
# parent would inflate every child's ru_maxrss. The model is made in a child (`--make`).

HIDDEN, INTER, HEADS, KV, VOCAB = 2048, 5632, 32, 4, 32000
SHARD_BYTES = 500 * 1024 * 1024
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    kv = HIDDEN // HEADS * KV
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
                (p + "self_attn.k_proj.weight", (kv, HIDDEN)), (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
                (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)), (p + "post_attention_layernorm.weight", (HIDDEN,)),
                (p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, INTER))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def make_model(path: Path, layers: int) -> int:
    """Write the synthetic model shard by shard (one tensor in memory at a time); returns its bytes."""
    import torch

    from loratools.io import Entry, ShardWriter
    path.mkdir(parents=True)
    shapes = llama_shapes(layers)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [Entry(n, "BF16", s) for n, s in shard]
        with ShardWriter(path / fname, entries, {"format": "pt"}) as w:
            for n, s in shard:
                t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02
                w.write(n, t.to(torch.bfloat16))
        total += sum(e.nbytes for e in entries)
        weight_map.update({n: fname for n, _ in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV,
              "num_hidden_layers": layers, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return total


def make_adapter(path: Path, layers: int, rank: int = 16) -> None:
    import torch

    from loratools import Adapter, AdapterConfig, Module, write_adapter

    g = torch.Generator().manual_seed(1)
    mods = {}
    for name, shape in llama_shapes(layers):
        if name.endswith(tuple(t + ".weight" for t in TARGETS)):
            out, inp = shape
            mods[name[: -len(".weight")]] = Module(A=torch.randn(rank, inp, generator=g) * 0.01,
                                                  B=torch.randn(out, rank, generator=g) * 0.01,
                                                  alpha=2 * rank, scale=2.0)
    cfg = AdapterConfig(target_modules=TARGETS, task_type="CAUSAL_LM", base_model=None)
    write_adapter(Adapter(mods, cfg), path, format="peft")


PEFT_SCRIPT = """
import sys, torch, transformers, peft
base, adapter, out = sys.argv[1:4]
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size="500MB")
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, child's peak RSS in MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return wall, ru.ru_maxrss / 1024


def bench(work: Path, layers: int, runs: int, peft_runs: int) -> dict[str, object]:
    base, adapter = work / f"base-{layers}", work / f"adapter-{layers}"
    py = sys.executable
    subprocess.run([py, __file__, "--make", str(work), str(layers)], check=True)
    nbytes = int((base / "model.safetensors.index.json").read_text() and
                 json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"])
    res: dict[str, object] = {"layers": layers, "model_bytes": nbytes}
    subprocess.run(["cat", *map(str, base.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm
    tools = {
        "cp": lambda o: ["cp", "-r", str(base), str(o)],
        "loratools": lambda o: [py, "-m", "loratools", "-q", "merge", str(base), str(adapter), "-o", str(o),
                                "--device", "cpu"],
        "peft": lambda o: [py, "-c", PEFT_SCRIPT, str(base), str(adapter), str(o)],
    }
    for tool, cmd in tools.items():
        n = peft_runs if tool == "peft" else runs
        walls, rss = [], []
        for _ in range(n):
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            load = os.getloadavg()[0]
            w, r = timed(cmd(out))
            walls.append(w)
            rss.append(r)
            print(f"  {layers} layers {tool}: {w:.2f} s, {r:.0f} MB (load {load:.1f})", flush=True)
        shutil.rmtree(work / "out", ignore_errors=True)
        res[tool] = {"wall_s": statistics.median(walls) if walls else None, "walls": walls,
                     "rss_mb": statistics.median(rss) if rss else None}
    # the exact-unmerge record: its size against the model
    out, rec = work / "out", work / "rec.safetensors"
    w, r = timed([py, "-m", "loratools", "-q", "merge", str(base), str(adapter), "-o", str(out), "--device", "cpu",
                  "--record", str(rec)])
    res["record"] = {"wall_s": w, "rss_mb": r, "bytes": rec.stat().st_size, "fraction": rec.stat().st_size / nbytes}
    shutil.rmtree(out, ignore_errors=True)
    rec.unlink()
    shutil.rmtree(base)
    shutil.rmtree(adapter)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[22, 44])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peft-runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lt-bench"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--make", nargs=2, metavar=("WORKDIR", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        work, layers = Path(args.make[0]), int(args.make[1])
        make_model(work / f"base-{layers}", layers)
        make_adapter(work / f"adapter-{layers}", layers)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "loadavg_start": os.getloadavg()}
    results = []
    try:
        for layers in args.layers:
            results.append(bench(args.workdir, layers, args.runs, args.peft_runs))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    print(json.dumps({"info": info, "results": results}, indent=2))
    print("\n| model | cp (floor) | loratools merge | peft merge_and_unload + save | merge / cp | peft / merge |"
          " loratools peak RSS | peft peak RSS | record size |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cp, lt, pf, rec = r["cp"], r["loratools"], r["peft"], r["record"]  # type: ignore[index]
        pw = f"{pf['wall_s']:.1f} s" if pf["wall_s"] else "—"
        ratio = f"{pf['wall_s'] / lt['wall_s']:.1f}×" if pf["wall_s"] else "—"
        prss = f"{pf['rss_mb']:.0f} MB" if pf["rss_mb"] else "—"
        print(f"| {r['layers']} layers, {r['model_bytes'] / 1e9:.2f} GB | {cp['wall_s']:.1f} s | {lt['wall_s']:.1f} s | "
              f"{pw} | {lt['wall_s'] / cp['wall_s']:.2f}× | {ratio} | {lt['rss_mb']:.0f} MB | {prss} | "
              f"{rec['bytes'] / 1e6:.1f} MB ({100 * rec['fraction']:.2f}%) |")


if __name__ == "__main__":
    main()
