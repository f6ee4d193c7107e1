"""Benchmark `loratools merge`, `merge --record` and `unmerge --record` against `cp -r` and peft.

A synthetic Llama-shaped model in bfloat16 (hidden 2048, intermediate 5632, 32 heads / 4 KV heads,
vocab 32000: TinyLlama's shapes) of about each size asked for (16 layers ≈ 1.67 GB, 34 layers ≈
3.26 GB; sizes under one layer shrink the vocabulary instead, for a quick check) is written in
shards with an index, with a PEFT LoRA r=16 on q, k, v, o, gate, up, down of every layer.

Paths timed, each as a child process, in alternating order (one run of every path per round):
  cp            cp -r BASE OUT (the floor: the same bytes written, base in the page cache)
  torch         python -c "import torch": the fixed cost no merge avoids, subtracted from merge in the table
  merge         python -m loratools -q merge BASE ADAPTER -o OUT --device cpu
  merge-dora    the same merge of a DoRA adapter: the LoRA factors plus a magnitude per row
                (m = ‖W0‖_row · (1 + 0.01·N(0, 1))); each adapted tensor also has its row norms taken
  peft          from_pretrained + PeftModel.from_pretrained(...).merge_and_unload() + save_pretrained
  merge-record  the merge with --record REC
  unmerge-record  python -m loratools -q unmerge MERGED ADAPTER -o OUT --record REC (exit 0 means
                every restored tensor matched the base's sha256)
For each: median wall time, median CPU time (the child's user + system) and median peak RSS (the
child's own ru_maxrss, from os.wait4). Not a test: run it by hand, on a quiet machine. Everything
lives under --workdir (default /tmp/lt-bench) and is deleted at the end unless --keep.

    python bench/merge.py --sizes 1.6 3.2 --runs 3 --peft-runs 3     # the issue's table
    python bench/merge.py --sizes 0.1 --runs 1 --peft-runs 1          # a quick end-to-end check
    python bench/merge.py --sizes 0.4 --runs 3 --peft-runs 0 --paths merge merge-dora   # DoRA beside LoRA
"""

from __future__ import annotations

import argparse
import json
import math
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
sys.path.insert(0, str(ROOT / "bench"))
from common import run_in_workdir, timed  # noqa: E402
# This process stays small (no torch): Linux keeps a process's peak RSS across fork+exec, so a fat
# parent would inflate every child's ru_maxrss. The model is made in a child (`--make`).

HIDDEN, INTER, HEADS, KV, VOCAB = 2048, 5632, 32, 4, 32000
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATHS = ("cp", "torch", "merge", "merge-dora", "peft", "merge-record", "unmerge-record")


def layer_bytes() -> int:
    kv = HIDDEN // HEADS * KV
    return 2 * (2 * HIDDEN + 2 * HIDDEN * HIDDEN + 2 * kv * HIDDEN + 3 * INTER * HIDDEN)


def shape_for(size_gb: float) -> tuple[int, int]:
    """(layers, vocab) of a model of at least ``size_gb`` GB (1e9 bytes), or of one layer and a smaller vocabulary."""
    target, head = size_gb * 1e9, 2 * 2 * VOCAB * HIDDEN + 2 * HIDDEN
    if target >= head + layer_bytes():
        return math.ceil((target - head) / layer_bytes()), VOCAB
    return 1, max(256, int((target - layer_bytes()) / (4 * HIDDEN)))


def llama_shapes(layers: int, vocab: int = VOCAB) -> list[tuple[str, tuple[int, ...]]]:
    kv = HIDDEN // HEADS * KV
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
                (p + "self_attn.k_proj.weight", (kv, HIDDEN)), (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
                (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)), (p + "post_attention_layernorm.weight", (HIDDEN,)),
                (p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, INTER))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (vocab, HIDDEN))]


def make_model(path: Path, layers: int, vocab: int, shard_bytes: int) -> int:
    """Write the synthetic model shard by shard (one tensor in memory at a time); returns its bytes."""
    import torch

    from loratools.io import Entry, ShardWriter
    path.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in llama_shapes(layers, vocab):
        n = 2 * math.prod(shape)
        if size + n > shard_bytes and shards[-1]:
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
              "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return total


def make_adapter(path: Path, layers: int, vocab: int, rank: int = 16, *, base: Path | None = None) -> None:
    """A PEFT LoRA r=``rank`` on every target; DoRA when ``base`` is given (m from its row norms)."""
    import torch

    from loratools import Adapter, AdapterConfig, Module, write_adapter
    from loratools.io import ModelReader

    g = torch.Generator().manual_seed(1)
    mods = {}
    for name, shape in llama_shapes(layers, vocab):
        if name.endswith(tuple(t + ".weight" for t in TARGETS)):
            out, inp = shape
            mods[name[: -len(".weight")]] = Module(A=torch.randn(rank, inp, generator=g) * 0.01,
                                                  B=torch.randn(out, rank, generator=g) * 0.01,
                                                  alpha=2 * rank, scale=2.0)
    if base is not None:
        with ModelReader(base) as r:
            mods = {n: m.with_factors(magnitude=r.get(f"{n}.weight").float().norm(dim=1)
                                      * (1 + 0.01 * torch.randn(m.B.shape[0], generator=g)))
                    for n, m in mods.items()}
    cfg = AdapterConfig(target_modules=TARGETS, task_type="CAUSAL_LM", base_model=None)
    write_adapter(Adapter(mods, cfg), path, format="peft")


PEFT_SCRIPT = """
import sys, torch, transformers, peft
base, adapter, out, shard = sys.argv[1:5]
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size=shard)
"""


def _commands(base: Path, adapter: Path, dora: Path, work: Path, shard: str) -> dict[str, list[str]]:
    py = sys.executable
    lt = [py, "-m", "loratools", "-q"]
    rec, merged = work / "rec.safetensors", work / "merged-rec"
    return {
        "cp": ["cp", "-r", str(base), str(work / "out")],
        "torch": [py, "-c", "import torch"],
        "merge": [*lt, "merge", str(base), str(adapter), "-o", str(work / "out"), "--device", "cpu"],
        "merge-dora": [*lt, "merge", str(base), str(dora), "-o", str(work / "out"), "--device", "cpu"],
        "peft": [py, "-c", PEFT_SCRIPT, str(base), str(adapter), str(work / "out"), shard],
        "merge-record": [*lt, "merge", str(base), str(adapter), "-o", str(merged), "--device", "cpu",
                         "--record", str(rec)],
        "unmerge-record": [*lt, "unmerge", str(merged), str(adapter), "-o", str(work / "out"), "--device", "cpu",
                           "--record", str(rec)],
    }


def _clean(work: Path, *, record: bool = False) -> None:
    shutil.rmtree(work / "out", ignore_errors=True)
    if record:  # the merged model and record that unmerge-record reads, once it has run
        shutil.rmtree(work / "merged-rec", ignore_errors=True)
        (work / "rec.safetensors").unlink(missing_ok=True)


def bench(work: Path, size_gb: float, runs: int, peft_runs: int, shard_mb: int,
          paths: tuple[str, ...] = PATHS) -> dict[str, object]:
    layers, vocab = shape_for(size_gb)
    base, adapter, dora = work / f"base-{size_gb}", work / f"adapter-{size_gb}", work / f"dora-{size_gb}"
    subprocess.run([sys.executable, __file__, "--make", str(base), str(adapter), str(layers), str(vocab),
                    str(shard_mb), str(dora)], check=True)
    nbytes = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    shards = len(list(base.glob("*.safetensors")))
    res: dict[str, object] = {"size_gb": size_gb, "layers": layers, "vocab": vocab, "model_bytes": nbytes,
                              "shards": shards}
    subprocess.run(["cat", *map(str, base.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm
    cmds = _commands(base, adapter, dora, work, f"{shard_mb}MB")
    samples: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
    for i in range(max(runs, peft_runs)):
        order = PATHS if i % 2 == 0 else PATHS[::-1][1:] + PATHS[-1:]  # alternate; unmerge stays after its merge
        for path in (p for p in order if p in paths):
            if (path == "peft" and i >= peft_runs) or (path != "peft" and i >= runs):
                continue
            _clean(work)
            subprocess.run(["sync"], check=True)
            load = os.getloadavg()[0]
            s = timed(cmds[path])
            samples[path].append(s)
            if path == "merge-record":
                res["record_bytes"] = (work / "rec.safetensors").stat().st_size
            if path == "unmerge-record":
                _clean(work, record=True)
            print(f"  {nbytes / 1e9:.2f} GB {path}: {s['wall_s']:.2f} s wall, {s['cpu_s']:.2f} s CPU, "
                  f"{s['rss_mb']:.0f} MB (load {load:.1f})", flush=True)
    _clean(work, record=True)
    for path, ss in samples.items():
        res[path] = {k: statistics.median(x[k] for x in ss) if ss else None for k in ("wall_s", "cpu_s", "rss_mb")}
        res[path]["runs"] = [x["wall_s"] for x in ss]  # type: ignore[index]
    shutil.rmtree(base)
    shutil.rmtree(adapter)
    shutil.rmtree(dora)
    return res


def table(results: list[dict[str, object]]) -> str:
    lines = ["| model | path | wall (median) | CPU (median) | peak RSS (median) | wall / cp | runs (wall, s) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        model = f"{r['layers']} layers, {r['model_bytes'] / 1e9:.2f} GB, {r['shards']} shards"  # type: ignore[operator]
        cp = r["cp"]["wall_s"]  # type: ignore[index]
        for path in PATHS:
            m = r[path]
            if m["wall_s"] is None:  # type: ignore[index]
                continue
            ratio = f"{m['wall_s'] / cp:.2f}×" if cp else "–"  # type: ignore[index]  # cp not timed: no ratio
            lines.append(f"| {model} | {path} | {m['wall_s']:.2f} s | {m['cpu_s']:.2f} s | {m['rss_mb']:.0f} MB | "  # type: ignore[index]
                         f"{ratio} | {' / '.join(f'{w:.2f}' for w in m['runs'])} |")  # type: ignore[index]
        torch_s, merge_s = r["torch"]["wall_s"], r["merge"]["wall_s"]  # type: ignore[index]
        if cp and torch_s is not None and merge_s is not None:
            lines.append(f"| {model} | merge − import torch | {merge_s - torch_s:.2f} s | | | "
                         f"{(merge_s - torch_s) / cp:.2f}× | |")
        if "record_bytes" in r:
            lines.append(f"| {model} | record size | {r['record_bytes'] / 1e6:.1f} MB "  # type: ignore[operator]
                         f"({100 * r['record_bytes'] / r['model_bytes']:.2f} %) | | | | |")  # type: ignore[operator]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.6, 3.2], help="model sizes in GB (1e9 bytes)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peft-runs", type=int, default=3, help="0 leaves peft out")
    ap.add_argument("--shard-mb", type=int, default=600, help="shard size (600 MB: 3 shards at 1.6 GB)")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="which paths to time")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lt-bench"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--make", nargs=6, metavar=("BASE", "ADAPTER", "LAYERS", "VOCAB", "SHARD_MB", "DORA"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        layers, vocab, shard_mb = (int(x) for x in args.make[2:5])
        make_model(Path(args.make[0]), layers, vocab, shard_mb * 1_000_000)
        make_adapter(Path(args.make[1]), layers, vocab)
        make_adapter(Path(args.make[5]), layers, vocab, base=Path(args.make[0]))
        return
    run_in_workdir(args.workdir, args.keep, lambda: [bench(args.workdir, size, args.runs, args.peft_runs, args.shard_mb,
                                                           tuple(args.paths)) for size in args.sizes],
                   table, "results")

if __name__ == "__main__":
    main()
