"""Benchmark `loratools merge` into a 4-bit base (bitsandbytes NF4, or GPTQ) against the merge into its bf16 original.

A synthetic Llama-shaped model (bench/merge.py's TinyLlama shapes: hidden 2048, intermediate 5632, 32 heads / 4 KV
heads, vocab 32000) with enough layers for about --size-gb GB (1e9 bytes) in the 4-bit format (NF4: 30 layers ≈
1.0 GB; the same model in bfloat16 ≈ 2.9 GB) is written twice in one pass, one tensor in memory at a time, and kept
under --workdir (default /tmp/lt-bench-<format>) for the next run (made again only when the size or layout changes):

  bf16   bench/merge.py's ``make_model``: every tensor bfloat16 (N(0, 0.02²) weights, norms 1)
  nf4    (--base-format nf4) the same bfloat16 tensors, every decoder linear weight (q, k, v, o, gate, up, down) as
         transformers 5.23 saves a ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` model:
         uint8 packed codes, float32 ``absmax`` per block of 64, ``quant_map``, ``quant_state.bitsandbytes__nf4``,
         made by ``loratools.quant.bnb.Bnb4bit("nf4").quantize`` (byte-equal to bitsandbytes 0.50.2's
         ``quantize_4bit``, tests/test_quant_bnb.py); embeddings, lm_head and norms stay bfloat16, as transformers
         keeps them
  gptq   (--base-format gptq) every decoder linear weight as a GPTQ v1 checkpoint (AutoGPTQ's usual export: 4 bits,
         group_size 128, sym, desc_act false): ``qweight`` int32 (in/8, out), ``qzeros`` int32 (groups, out/8)
         holding 8 − 1, float16 ``scales`` (groups, out) = 2·max|w|/15 per group (AutoGPTQ ``quantizer.py``'s
         symmetric ``find_params``, round-to-nearest instead of its Hessian-driven GPTQ rounding: the layout, not
         the calibration, is what a merge reads), ``g_idx``; packed by ``loratools.quant.gptq.GptqFormat.pack``
         (whose reading is vLLM's reference bit for bit, tests/test_quant_gptq.py)

The adapter is bench/fp8_merge.py's (PEFT LoRA r=16 on q, k, v, o; ‖ΔW‖/‖W‖ ≈ 2 %). A 4-bit step is about
10 % of a block's largest weight, so requantizing W0 + ΔW keeps only a fraction of a 2 % update: the keep-format merge
is refused by its erase guard (≥ 50 % of ΔW kept) and runs here with --allow-lossy; the share it keeps is read
from its --json report and printed.

Paths timed, each as a child process, alternating (order reversed every other round), a fresh output (deleted,
then ``sync``) before each (FMT: nf4 or gptq):
  cp              cp -r QUANTIZED OUT (the floor: the 4-bit model's bytes, in the page cache, written)
  merge-bf16      python -m loratools -q merge BF16 ADAPTER -o OUT --device cpu
  merge-FMT       python -m loratools -q merge QUANTIZED ADAPTER -o OUT --device cpu --allow-lossy --json  (kept)
  merge-FMT-bf16  python -m loratools -q merge QUANTIZED ADAPTER -o OUT --device cpu --dtype bfloat16  (plain)
For each: median wall time, median CPU time (user + system), its ratio to the bf16 merge's, and median peak RSS
(the child's ru_maxrss from os.wait4; this parent imports no torch, the models are made in a child). Not a test:
run it by hand.

    python bench/merge_nf4.py --size-gb 1 --runs 3 --json bench/results/merge_nf4.json   # the issue's figures
    python bench/merge_nf4.py --base-format gptq --size-gb 1 --runs 3 --json bench/results/merge_gptq.json
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
GROUP = 128
#: what AutoGPTQ writes (transformers 5.23 ``GPTQConfig`` fields) for a 4-bit, group 128, symmetric export
GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True, "desc_act": False,
               "checkpoint_format": "gptq"}
FORMATS = ("nf4", "gptq")


def paths(fmt: str) -> tuple[str, ...]:
    return ("cp", "merge-bf16", f"merge-{fmt}", f"merge-{fmt}-bf16")


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


def gptq_entries(name: str, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of what the GPTQ model stores for one bfloat16 tensor."""
    if not is_quantized(name):
        return [(name, "BF16", shape)]
    (out, n_in), prefix, groups = shape, name.removesuffix(".weight"), -(-shape[1] // GROUP)
    return [(prefix + ".qweight", "I32", (n_in // 8, out)), (prefix + ".qzeros", "I32", (groups, out // 8)),
            (prefix + ".scales", "F16", (groups, out)), (prefix + ".g_idx", "I32", (n_in,))]


def gptq_quantize(name: str, w: Any) -> dict[str, Any]:
    """One weight as AutoGPTQ's symmetric 4-bit round-to-nearest stores it (the module docstring)."""
    import torch

    from loratools.quant.gptq import GptqFormat

    out, n_in = w.shape
    groups = w.float().reshape(out, n_in // GROUP, GROUP)
    s = (groups.abs().amax(-1) * 2 / 15).clamp_min(1e-8).half()  # (out, G), rounded as stored
    q = torch.clamp(torch.round(groups / s.float()[..., None]) + 8, 0, 15).reshape(out, n_in).to(torch.int32)
    z = torch.full((n_in // GROUP, out), 8, dtype=torch.int32)
    prefix = name.removesuffix(".weight")
    return dict(zip((prefix + p for p in (".qweight", ".qzeros", ".scales", ".g_idx")),
                    GptqFormat(4, GROUP, v1=True).pack(q, z, s.t().contiguous())))


def entries(fmt: str, name: str, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
    return nf4_entries(name, shape) if fmt == "nf4" else gptq_entries(name, shape)


def layer_bytes(fmt: str) -> int:
    """One decoder layer's bytes in ``fmt``, from the entries it stores (norms in bfloat16; NF4's quant state of a
    few hundred bytes is counted with a stand-in shape). No torch: this parent stays small, as bench/common.py's
    ``timed`` needs (a child's ru_maxrss starts at its parent's peak)."""
    size = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "U8": 1}
    return sum(size[d] * math.prod(s) for n, shape in llama_shapes(1) if ".layers." in n
               for _, d, s in (gptq_entries(n, shape) if fmt == "gptq" else _nf4_sized(n, shape)))


def _nf4_sized(name: str, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
    """:func:`nf4_entries` without the torch it needs for the quant state's exact size (counted as 0 bytes)."""
    if not is_quantized(name):
        return [(name, "BF16", shape)]
    n = math.prod(shape)
    return [(name, "U8", (-(-n // 2),)), (name + ".absmax", "F32", (-(-n // BLOCKSIZE),)),
            (name + ".quant_map", "F32", (16,))]


def layers_for(size_gb: float, fmt: str = "nf4") -> int:
    """Decoder layers for a ``fmt`` model of about ``size_gb`` GB (at least one); the embeddings and head are bf16."""
    return max(1, round((size_gb * 1e9 - 2 * 2 * VOCAB * HIDDEN) / layer_bytes(fmt)))


def make_models(bf16: Path, quantized: Path, layers: int, vocab: int, shard_bytes: int, fmt: str = "nf4") -> None:
    """bench/merge.py's bfloat16 model, then its 4-bit twin read from it tensor by tensor (one in memory at a
    time)."""
    from loratools.io import ModelReader
    from loratools.quant.bnb import Bnb4bit

    make_model(bf16, layers, vocab, shard_bytes)
    shapes = llama_shapes(layers, vocab)
    wq = Sharded(quantized, [e for n, s in shapes for e in entries(fmt, n, s)], shard_bytes)
    codec, reader = Bnb4bit("nf4", BLOCKSIZE), ModelReader(bf16)
    for name, shape in shapes:
        t = reader.get(name)
        stored = ({name: t} if not is_quantized(name) else codec.quantize(name, t) if fmt == "nf4"
                  else gptq_quantize(name, t))
        for key, _, _ in entries(fmt, name, shape):
            wq.write(key, stored[key])
    wq.finish({**json.loads((bf16 / "config.json").read_text()),
               "quantization_config": QCONFIG if fmt == "nf4" else GPTQ_CONFIG})


def _ensure_models(work: Path, layers: int, vocab: int, shard_mb: int, fmt: str) -> dict[str, object]:
    """The two models and the adapter under ``work``, made once per (layers, vocab, shard_mb, format)."""
    made_path = work / "made.json"
    key = {"layers": layers, "vocab": vocab, "shard_mb": shard_mb, "format": fmt}
    if made_path.is_file() and {k: v for k, v in json.loads(made_path.read_text()).items() if k in key} == key:
        return json.loads(made_path.read_text())
    for d in ("bf16", fmt, "adapter"):
        shutil.rmtree(work / d, ignore_errors=True)
    made_path.unlink(missing_ok=True)
    subprocess.run([sys.executable, __file__, "--make", str(work), str(layers), str(vocab), str(shard_mb), fmt],
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
    kept = path.startswith("merge-") and path != "merge-bf16" and not path.endswith("-bf16")
    s = timed(["sh", "-c", " ".join(cmd) + f" > {report}"] if kept else cmd)
    s["load1_before"] = load
    s["round"] = i + 1
    if kept and i == 0:  # what the keep-format merge wrote and kept, once
        cfg = json.loads((out / "config.json").read_text())
        res[f"{path.split('-')[1]}_out"] = {**_model_info(out), "quantization_config": cfg.get("quantization_config"),
                          **_kept(json.loads(report.read_text()))}
    print(f"  round {i + 1} {path}: {s['wall_s']:.2f} s wall, {s['cpu_s']:.2f} s CPU, "
          f"{s['rss_mb']:.0f} MB (load {load:.1f})", flush=True)
    return s


def bench(work: Path, size_gb: float, runs: int, shard_mb: int, fmt: str = "nf4") -> dict[str, object]:
    layers, vocab = layers_for(size_gb, fmt), VOCAB
    work.mkdir(parents=True, exist_ok=True)
    made = _ensure_models(work, layers, vocab, shard_mb, fmt)
    bf16, qm, adapter = work / "bf16", work / fmt, work / "adapter"
    res: dict[str, object] = {"size_gb": size_gb, "format": fmt, "layers": layers, "vocab": vocab,
                              "bf16": _model_info(bf16), fmt: _model_info(qm),
                              "adapter": {"rank": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                          "delta_rel_first_module": made["delta_rel"]}}
    for m in (bf16, qm):  # into the page cache, as after a download
        subprocess.run(["cat", *map(str, m.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)
    lt = [sys.executable, "-m", "loratools"]
    out = work / "out"
    into = [*lt, "-q", "merge", str(qm), str(adapter), "-o", str(out), "--device", "cpu"]
    cmds = {"cp": ["cp", "-r", str(qm), str(out)],
            "merge-bf16": [*lt, "-q", "merge", str(bf16), str(adapter), "-o", str(out), "--device", "cpu"],
            f"merge-{fmt}": [*into, "--allow-lossy", "--json"], f"merge-{fmt}-bf16": [*into, "--dtype", "bfloat16"]}
    samples: dict[str, list[dict[str, float]]] = {p: [] for p in paths(fmt)}
    for i in range(runs):
        for path in paths(fmt) if i % 2 == 0 else paths(fmt)[::-1]:
            samples[path].append(_one(path, cmds[path], out, res, i))
    shutil.rmtree(out, ignore_errors=True)
    res["paths"] = {p: {"median": {k: statistics.median(x[k] for x in ss) for k in ("wall_s", "cpu_s", "rss_mb")},
                        "runs": ss} for p, ss in samples.items()}
    return res


def table(r: dict[str, Any]) -> str:
    """Medians per path, and each one's CPU time over the bf16 merge's (the machine is shared: CPU time is the
    steadier figure), then every run's wall and CPU seconds."""
    fmt = r.get("format", "nf4")
    up = fmt.upper()
    names = {"cp": f"cp -r ({up} model)", "merge-bf16": "merge, bf16 base",
             f"merge-{fmt}": f"merge, {up} base (kept {up})",
             f"merge-{fmt}-bf16": f"merge, {up} base, --dtype bfloat16"}
    timings, kept = r["paths"], r.get(f"{fmt}_out", {})
    cpu_bf16 = timings["merge-bf16"]["median"]["cpu_s"]
    lines = [f"{r['layers']} layers; ‖ΔW‖/‖W‖ = {r['adapter']['delta_rel_first_module']:.4f}; the kept-{up} merge "
             f"keeps {kept.get('kept', float('nan')):.3g} of ΔW "
             f"(‖written − ΔW‖/‖ΔW‖ {kept.get('rel_error', 0):.3g})",
             "", "| path | input model | wall | CPU | CPU / bf16 merge | peak RSS | runs: wall / CPU (s) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for p in paths(fmt):
        m, size = timings[p]["median"], r["bf16" if p == "merge-bf16" else fmt]
        each = ", ".join(f"{x['wall_s']:.1f} / {x['cpu_s']:.1f}" for x in timings[p]["runs"])
        lines.append(f"| {names[p]} | {size['bytes'] / 1e9:.2f} GB, {size['shards']} shards | {m['wall_s']:.2f} s | "
                     f"{m['cpu_s']:.2f} s | {m['cpu_s'] / cpu_bf16:.2f}× | {m['rss_mb']:.0f} MB | {each} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="the NF4 model's size in GB (1e9 bytes)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--base-format", choices=FORMATS, default="nf4", help="the 4-bit format of the base")
    ap.add_argument("--workdir", type=Path, help="models are kept here (default /tmp/lt-bench-FORMAT)")
    ap.add_argument("--json", type=Path, help="also write the JSON here (bench/results/merge_nf4.json)")
    ap.add_argument("--make", nargs=5, metavar=("WORK", "LAYERS", "VOCAB", "SHARD_MB", "FORMAT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        work, fmt = Path(args.make[0]), args.make[4]
        layers, vocab, shard_mb = (int(x) for x in args.make[1:4])
        make_models(work / "bf16", work / fmt, layers, vocab, shard_mb * 1_000_000, fmt)
        ratio = make_adapter(work / "adapter", layers, vocab)
        (work / "made.json").write_text(json.dumps({"layers": layers, "vocab": vocab, "shard_mb": shard_mb,
                                                    "format": fmt, "delta_rel": ratio}))
        return
    command = " ".join(["python", "bench/merge_nf4.py", *sys.argv[1:]])
    info = run_info()
    work = args.workdir or Path(f"/tmp/lt-bench-{args.base_format}")
    result = {"command": command, **bench(work, args.size_gb, args.runs, args.shard_mb, args.base_format)}
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
