"""Benchmark `loratools merge` into a bitsandbytes NF4 model against the same merge into its bfloat16 original.

A synthetic Llama-shaped model (bench/merge.py's TinyLlama shapes: hidden 2048, intermediate 5632, 32 heads / 4 KV
heads, vocab 32000) with enough layers for about --size-gb GB (1e9 bytes) in NF4 (30 layers ≈ 1.0 GB; the same
model in bfloat16 ≈ 2.9 GB) is written twice in one pass, one tensor in memory at a time, and kept under --workdir
(default /tmp/lt-bench-nf4) for the next run (made again only when the size or layout changes):

  bf16   bench/merge.py's ``make_model``: every tensor bfloat16 (N(0, 0.02²) weights, norms 1)
  nf4    the same bfloat16 tensors, every decoder linear weight (q, k, v, o, gate, up, down) as transformers 5.23
         saves a ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` model: uint8 packed codes,
         float32 ``absmax`` per block of 64, ``quant_map``, ``quant_state.bitsandbytes__nf4``, made by
         ``loratools.quant.bnb.Bnb4bit("nf4").quantize`` (byte-equal to bitsandbytes 0.50.2's ``quantize_4bit``,
         tests/test_quant_bnb.py); embeddings, lm_head and norms stay bfloat16, as transformers keeps them

The adapter is bench/fp8_merge.py's (PEFT LoRA r=16 on q, k, v, o; ‖ΔW‖/‖W‖ ≈ 2 %). NF4's step is about 10 % of
a block's largest weight, so requantizing W0 + ΔW to NF4 keeps only a fraction of a 2 % update: the keep-format
merge is refused by its erase guard (≥ 50 % of ΔW kept) and runs here with --allow-lossy; the share it keeps is
read from its --json report and printed.

Paths timed, each as a child process, alternating (order reversed every other round), a fresh output (deleted,
then ``sync``) before each:
  cp              cp -r NF4 OUT (the floor: the NF4 model's bytes, in the page cache, written)
  merge-bf16      python -m loratools -q merge BF16 ADAPTER -o OUT --device cpu
  merge-nf4       python -m loratools -q merge NF4 ADAPTER -o OUT --device cpu --allow-lossy --json  (kept NF4)
  merge-nf4-bf16  python -m loratools -q merge NF4 ADAPTER -o OUT --device cpu --dtype bfloat16   (written plain)
For each: median wall time, median CPU time (user + system), its ratio to the bf16 merge's, and median peak RSS
(the child's ru_maxrss from os.wait4; this parent imports no torch, the models are made in a child). Not a test:
run it by hand.

    python bench/merge_nf4.py --size-gb 1 --runs 3 --json bench/results/merge_nf4.json   # the issue's figures
    python bench/merge_nf4.py --size-gb 0.3 --runs 1 --workdir /tmp/lt-bench-nf4-small    # a quick check
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import run_info, timed  # noqa: E402
from fp8_merge import QUANTIZED, Sharded, _model_info, make_adapter  # noqa: E402  (the FP8 bench's model, adapter)
from merge import HIDDEN, VOCAB, llama_shapes, make_model  # noqa: E402  (its bf16 model)

BLOCKSIZE = 64
#: what transformers 5.23 writes into config.json for BitsAndBytesConfig(load_in_4bit=True, nf4), the fields
#: loratools reads (``loratools.quant.bnb.bnb_codec``) and a few of the others it writes
QCONFIG = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
           "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "bfloat16",
           "bnb_4bit_quant_storage": "uint8", "llm_int8_threshold": 6.0, "llm_int8_skip_modules": None}
PATHS = ("cp", "merge-bf16", "merge-nf4", "merge-nf4-bf16")


def is_quantized(name: str) -> bool:
    return ".layers." in name and name.endswith(tuple(t + ".weight" for t in QUANTIZED))


def nf4_entries(name: str, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of what the NF4 model stores for one bfloat16 tensor."""
    from loratools.quant.bnb import Bnb4bitState

    if not is_quantized(name):
        return [(name, "BF16", shape)]
    n = math.prod(shape)
    state = Bnb4bitState("nf4", BLOCKSIZE, "bfloat16", (shape[0], shape[1])).to_json()
    return [(name, "U8", (-(-n // 2), 1)), (name + ".absmax", "F32", (-(-n // BLOCKSIZE),)),
            (name + ".quant_map", "F32", (16,)), (name + ".quant_state.bitsandbytes__nf4", "U8", tuple(state.shape))]


def nf4_layer_bytes() -> int:
    """One decoder layer's bytes in NF4: codes (½ byte a weight), float32 absmax per 64, the 64-byte code table
    (the quant state's few hundred bytes left out); norms in bfloat16. No torch: this parent stays small, as
    bench/common.py's ``timed`` needs (a child's ru_maxrss starts at its parent's peak)."""
    per = dict(llama_shapes(1))
    return sum(math.prod(s) // 2 + 4 * -(-math.prod(s) // BLOCKSIZE) + 64 if is_quantized(n) else 2 * math.prod(s)
               for n, s in per.items() if ".layers." in n)


def layers_for(size_gb: float) -> int:
    """Decoder layers for an NF4 model of about ``size_gb`` GB (at least one); the embeddings and head are bf16."""
    return max(1, round((size_gb * 1e9 - 2 * 2 * VOCAB * HIDDEN) / nf4_layer_bytes()))


def make_models(bf16: Path, nf4: Path, layers: int, vocab: int, shard_bytes: int) -> None:
    """bench/merge.py's bfloat16 model, then its NF4 twin read from it tensor by tensor (one in memory at a time)."""
    from loratools.io import ModelReader
    from loratools.quant.bnb import Bnb4bit

    make_model(bf16, layers, vocab, shard_bytes)
    shapes = llama_shapes(layers, vocab)
    wq = Sharded(nf4, [e for n, s in shapes for e in nf4_entries(n, s)], shard_bytes)
    codec, reader = Bnb4bit("nf4", BLOCKSIZE), ModelReader(bf16)
    for name, shape in shapes:
        t = reader.get(name)
        stored = codec.quantize(name, t) if is_quantized(name) else {name: t}
        for key, _, _ in nf4_entries(name, shape):
            wq.write(key, stored[key])
    wq.finish({**json.loads((bf16 / "config.json").read_text()), "quantization_config": QCONFIG})


def _ensure_models(work: Path, layers: int, vocab: int, shard_mb: int) -> dict[str, object]:
    """The two models and the adapter under ``work``, made once per (layers, vocab, shard_mb)."""
    made_path = work / "made.json"
    key = {"layers": layers, "vocab": vocab, "shard_mb": shard_mb}
    if made_path.is_file() and {k: v for k, v in json.loads(made_path.read_text()).items() if k in key} == key:
        return json.loads(made_path.read_text())
    for d in ("bf16", "nf4", "adapter"):
        shutil.rmtree(work / d, ignore_errors=True)
    made_path.unlink(missing_ok=True)
    subprocess.run([sys.executable, __file__, "--make", str(work), str(layers), str(vocab), str(shard_mb)],
                   check=True)
    return json.loads(made_path.read_text())


def _kept(report: dict[str, object]) -> dict[str, object]:
    """The keep-format merge's figures: the share of ΔW the written NF4 model keeps (``update`` of its report)."""
    update = report.get("update") or {}
    return {k: update.get(k) for k in ("kept", "rel_error", "lossy")} if isinstance(update, dict) else {}


def _one(path: str, cmd: list[str], out: Path, res: dict[str, object], i: int) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    load = os.getloadavg()[0]
    report = out.with_name("report.json")
    s = timed(["sh", "-c", " ".join(cmd) + f" > {report}"] if path == "merge-nf4" else cmd)
    s["load1_before"] = load
    s["round"] = i + 1
    if path == "merge-nf4" and i == 0:  # what the keep-format merge wrote and kept, once
        cfg = json.loads((out / "config.json").read_text())
        res["nf4_out"] = {**_model_info(out), "quantization_config": cfg.get("quantization_config"),
                          **_kept(json.loads(report.read_text()))}
    print(f"  round {i + 1} {path}: {s['wall_s']:.2f} s wall, {s['cpu_s']:.2f} s CPU, "
          f"{s['rss_mb']:.0f} MB (load {load:.1f})", flush=True)
    return s


def bench(work: Path, size_gb: float, runs: int, shard_mb: int) -> dict[str, object]:
    layers, vocab = layers_for(size_gb), VOCAB
    work.mkdir(parents=True, exist_ok=True)
    made = _ensure_models(work, layers, vocab, shard_mb)
    bf16, nf4, adapter = work / "bf16", work / "nf4", work / "adapter"
    res: dict[str, object] = {"size_gb": size_gb, "layers": layers, "vocab": vocab, "bf16": _model_info(bf16),
                              "nf4": _model_info(nf4), "adapter": {"rank": 16, "targets": ["q_proj", "k_proj",
                                                                   "v_proj", "o_proj"],
                                                                   "delta_rel_first_module": made["delta_rel"]}}
    for m in (bf16, nf4):  # into the page cache, as after a download
        subprocess.run(["cat", *map(str, m.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)
    lt = [sys.executable, "-m", "loratools"]
    out = work / "out"
    cmds = {"cp": ["cp", "-r", str(nf4), str(out)],
            "merge-bf16": [*lt, "-q", "merge", str(bf16), str(adapter), "-o", str(out), "--device", "cpu"],
            "merge-nf4": [*lt, "-q", "merge", str(nf4), str(adapter), "-o", str(out), "--device", "cpu",
                          "--allow-lossy", "--json"],
            "merge-nf4-bf16": [*lt, "-q", "merge", str(nf4), str(adapter), "-o", str(out), "--device", "cpu",
                               "--dtype", "bfloat16"]}
    samples: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
    for i in range(runs):
        for path in PATHS if i % 2 == 0 else PATHS[::-1]:
            samples[path].append(_one(path, cmds[path], out, res, i))
    shutil.rmtree(out, ignore_errors=True)
    res["paths"] = {p: {"median": {k: statistics.median(x[k] for x in ss) for k in ("wall_s", "cpu_s", "rss_mb")},
                        "runs": ss} for p, ss in samples.items()}
    return res


def table(r: dict[str, Any]) -> str:
    """Medians per path, and each one's CPU time over the bf16 merge's (the machine is shared: CPU time is the
    steadier figure), then every run's wall and CPU seconds."""
    names = {"cp": "cp -r (NF4 model)", "merge-bf16": "merge, bf16 base", "merge-nf4": "merge, NF4 base (kept NF4)",
             "merge-nf4-bf16": "merge, NF4 base, --dtype bfloat16"}
    paths, kept = r["paths"], r.get("nf4_out", {})
    cpu_bf16 = paths["merge-bf16"]["median"]["cpu_s"]
    lines = [f"{r['layers']} layers; ‖ΔW‖/‖W‖ = {r['adapter']['delta_rel_first_module']:.4f}; the kept-NF4 merge "
             f"keeps {kept.get('kept', float('nan')):.3g} of ΔW (‖written − ΔW‖/‖ΔW‖ {kept.get('rel_error', 0):.3g})",
             "", "| path | input model | wall | CPU | CPU / bf16 merge | peak RSS | runs: wall / CPU (s) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for p in PATHS:
        m, size = paths[p]["median"], r["bf16" if p == "merge-bf16" else "nf4"]
        each = ", ".join(f"{x['wall_s']:.1f} / {x['cpu_s']:.1f}" for x in paths[p]["runs"])
        lines.append(f"| {names[p]} | {size['bytes'] / 1e9:.2f} GB, {size['shards']} shards | {m['wall_s']:.2f} s | "
                     f"{m['cpu_s']:.2f} s | {m['cpu_s'] / cpu_bf16:.2f}× | {m['rss_mb']:.0f} MB | {each} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="the NF4 model's size in GB (1e9 bytes)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lt-bench-nf4"), help="models are kept here")
    ap.add_argument("--json", type=Path, help="also write the JSON here (bench/results/merge_nf4.json)")
    ap.add_argument("--make", nargs=4, metavar=("WORK", "LAYERS", "VOCAB", "SHARD_MB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        work = Path(args.make[0])
        layers, vocab, shard_mb = (int(x) for x in args.make[1:])
        make_models(work / "bf16", work / "nf4", layers, vocab, shard_mb * 1_000_000)
        ratio = make_adapter(work / "adapter", layers, vocab)
        (work / "made.json").write_text(json.dumps({"layers": layers, "vocab": vocab, "shard_mb": shard_mb,
                                                    "delta_rel": ratio}))
        return
    command = " ".join(["python", "bench/merge_nf4.py", *sys.argv[1:]])
    info = run_info()
    result = {"command": command, **bench(args.workdir, args.size_gb, args.runs, args.shard_mb)}
    info["loadavg_end"] = os.getloadavg()
    text = json.dumps({"info": info, "result": result}, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    print()
    print(table(result))


if __name__ == "__main__":
    main()
