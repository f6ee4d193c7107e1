"""Benchmark `loratools merge` of a LoRA into a GGUF model against `cp` of the file.

A synthetic Llama-shaped GGUF model (hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000:
TinyLlama's shapes; ``general.architecture = llama``) of about the size asked for is written with the
gguf package, tensor by tensor: every 2-D tensor Q8_0 (``loratools.gguf.quants.quantize`` of
N(0, 0.02²) float32), the norms F32. 19 layers ≈ 1.03 GB; sizes under one layer shrink the
vocabulary instead, for a quick check. The adapter is bench/merge.py's: a PEFT LoRA r=16 on q, k, v,
o, gate, up, down of every layer, transformers module names (loratools maps them to GGUF names).

Paths timed, each as a child process, alternating (one run of each per round):
  cp      cp MODEL.gguf OUT.gguf (the floor: the same bytes written, the model in the page cache)
  merge   python -m loratools -q merge MODEL.gguf ADAPTER -o OUT.gguf   (--quant same: Q8_0 stays Q8_0)
  record  the same with --record R (also replays the un-merge to write the patches); once per round after it,
          `unmerge OUT.gguf ADAPTER -o BACK.gguf --record R` (untimed) must give MODEL.gguf's sha256 back
The record's size is reported beside the adapted tensors' bytes (what its patches restore).
For each: median wall time, median CPU time (the child's user + system) and median peak RSS (the
child's ru_maxrss), from os.wait4 (bench/merge.py's `timed`). Also the merged file's size beside
the size llama.cpp's `export-lora` would write: it writes every merged tensor as F16, so that size is
*computed* from the tensor shapes (the model's bytes, less the adapted tensors' Q8_0 bytes, plus 2
bytes per adapted value), not run. Not a test: run it by hand on a quiet machine.

    python bench/gguf_merge.py --size-gb 1 --runs 3        # the issue's figures
    python bench/gguf_merge.py --size-gb 0.05 --runs 1     # a quick end-to-end check
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# This process stays small (no torch, no numpy): Linux keeps a process's peak RSS across fork+exec,
# so a fat parent would inflate every child's ru_maxrss. The model is made in a child (`--make`).
# bench/merge.py (bench/ is sys.path[0] when this runs as a script): its shapes, adapter and timing
from common import run_in_workdir, timed  # noqa: E402
from merge import HEADS, HIDDEN, INTER, KV, TARGETS, VOCAB, llama_shapes, make_adapter  # noqa: E402

Q8_BYTES = 34 / 32  # Q8_0: a float16 scale + 32 int8 per block of 32 values
#: transformers name suffix → llama.cpp tensor (gguf's TENSOR_MAPPINGS for llama)
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    """llama.cpp's name for one of :func:`llama_shapes`' transformers names."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def tensor_bytes(shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    return 4 * n if len(shape) == 1 else int(n * Q8_BYTES)


def shape_for(size_gb: float) -> tuple[int, int]:
    """(layers, vocab) of a model of at least ``size_gb`` GB (1e9 bytes), or of one layer and a smaller vocabulary."""
    layer = sum(tensor_bytes(s) for _, s in llama_shapes(1, 8)[1:-2])
    head = 2 * tensor_bytes((VOCAB, HIDDEN)) + 4 * HIDDEN
    target = size_gb * 1e9
    if target >= head + layer:
        return math.ceil((target - head) / layer), VOCAB
    return 1, max(256, int((target - layer) / (2 * Q8_BYTES * HIDDEN)))


def make_gguf(path: Path, layers: int, vocab: int) -> None:
    """Write the model tensor by tensor (one in memory at a time): infos first, then the data."""
    import gguf
    import numpy as np

    from loratools.gguf.quants import quantize
    shapes = [(gguf_name(n), s) for n, s in llama_shapes(layers, vocab)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", layers)
    w.add_uint32("llama.context_length", 2048)
    w.add_uint32("llama.embedding_length", HIDDEN)
    w.add_uint32("llama.feed_forward_length", INTER)
    w.add_uint32("llama.attention.head_count", HEADS)
    w.add_uint32("llama.attention.head_count_kv", KV)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("general.name", "bench-llama")
    for name, s in shapes:
        q8 = len(s) == 2
        byte_shape = (s[0], s[1] // 32 * 34) if q8 else s  # gguf takes a quantized tensor's shape in bytes
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8 if q8 else np.float32), tensor_bytes(s),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0 if q8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, s in shapes:
        if len(s) == 1:
            w.write_tensor_data(np.ones(s, np.float32))
        else:
            w.write_tensor_data(quantize(rng.standard_normal(s, dtype=np.float32) * np.float32(0.02), "Q8_0"))
    w.close()


def export_lora_bytes(model_bytes: int, layers: int, vocab: int) -> int:
    """The file llama.cpp's export-lora would write (computed): adapted tensors as F16, the rest as they are."""
    adapted = [s for n, s in llama_shapes(layers, vocab) if n.endswith(tuple(t + ".weight" for t in TARGETS))]
    return model_bytes - sum(tensor_bytes(s) for s in adapted) + sum(2 * math.prod(s) for s in adapted)


def record_check(model: Path, adapter: Path, out: Path, rec: Path, layers: int, vocab: int) -> dict[str, object]:
    """The record's size against the adapted tensors' bytes, and whether `unmerge --record` gives MODEL back."""
    back = out.with_name("back.gguf")
    subprocess.run([sys.executable, "-m", "loratools", "-q", "unmerge", str(out), str(adapter), "-o", str(back),
                    "--record", str(rec), "--force"], check=True)
    same = subprocess.run(["cmp", "-s", str(model), str(back)]).returncode == 0
    back.unlink()
    adapted = sum(tensor_bytes(s) for n, s in llama_shapes(layers, vocab)
                  if n.endswith(tuple(t + ".weight" for t in TARGETS)))
    return {"record_bytes": rec.stat().st_size, "adapted_bytes": adapted, "unmerge_record_identical": same}


def bench(work: Path, size_gb: float, runs: int) -> dict[str, object]:
    layers, vocab = shape_for(size_gb)
    model, adapter, out = work / "model.gguf", work / "adapter", work / "out.gguf"
    subprocess.run([sys.executable, __file__, "--make", str(model), str(adapter), str(layers), str(vocab)], check=True)
    nbytes = model.stat().st_size
    res: dict[str, object] = {"size_gb": size_gb, "layers": layers, "vocab": vocab, "model_bytes": nbytes,
                              "export_lora_bytes_computed": export_lora_bytes(nbytes, layers, vocab)}
    subprocess.run(["cat", str(model)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    lt = [sys.executable, "-m", "loratools", "-q"]
    rec = work / "r.safetensors"
    cmds = {"cp": ["cp", str(model), str(out)],
            "merge": [*lt, "merge", str(model), str(adapter), "-o", str(out)],
            "record": [*lt, "merge", str(model), str(adapter), "-o", str(out), "--record", str(rec), "--force"]}
    samples: dict[str, list[dict[str, float]]] = {p: [] for p in cmds}
    for i in range(runs):
        for path in (("cp", "merge", "record") if i % 2 == 0 else ("record", "merge", "cp")):
            out.unlink(missing_ok=True)
            subprocess.run(["sync"], check=True)
            load = os.getloadavg()[0]
            s = timed(cmds[path])
            samples[path].append(s)
            if path == "merge":
                res["merged_bytes"] = out.stat().st_size
            if path == "record":
                res.update(record_check(model, adapter, out, rec, layers, vocab))
            print(f"  {nbytes / 1e9:.2f} GB {path}: {s['wall_s']:.2f} s wall, {s['cpu_s']:.2f} s CPU, "
                  f"{s['rss_mb']:.0f} MB (load {load:.1f})", flush=True)
    for path, ss in samples.items():
        res[path] = {k: statistics.median(x[k] for x in ss) for k in ("wall_s", "cpu_s", "rss_mb")}
        res[path]["runs"] = [x["wall_s"] for x in ss]  # type: ignore[index]
    return res


def table(r: dict[str, object]) -> str:
    model = f"{r['layers']} layers, {r['model_bytes'] / 1e9:.2f} GB Q8_0"  # type: ignore[operator]
    cp = r["cp"]["wall_s"]  # type: ignore[index]
    lines = ["| model | path | wall (median) | CPU (median) | peak RSS (median) | wall / cp | runs (wall, s) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for path in ("cp", "merge", "record"):
        m = r[path]
        lines.append(f"| {model} | {path} | {m['wall_s']:.2f} s | {m['cpu_s']:.2f} s | {m['rss_mb']:.0f} MB | "  # type: ignore[index]
                     f"{m['wall_s'] / cp:.2f}× | {' / '.join(f'{w:.2f}' for w in m['runs'])} |")  # type: ignore[index]
    lines += ["", f"Output: loratools {r['merged_bytes'] / 1e9:.3f} GB (Q8_0 kept); llama.cpp export-lora "  # type: ignore[operator]
              f"{r['export_lora_bytes_computed'] / 1e9:.3f} GB (computed: adapted tensors as F16)",  # type: ignore[operator]
              f"Record: {r['record_bytes'] / 1e6:.1f} MB = {r['record_bytes'] / r['adapted_bytes']:.3f} of the adapted "  # type: ignore[operator]
              f"tensors' {r['adapted_bytes'] / 1e6:.0f} MB; unmerge --record gives the model back byte for byte: "  # type: ignore[operator]
              f"{r['unmerge_record_identical']}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="model size in GB (1e9 bytes)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lt-bench-gguf"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--make", nargs=4, metavar=("MODEL", "ADAPTER", "LAYERS", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        layers, vocab = int(args.make[2]), int(args.make[3])
        make_gguf(Path(args.make[0]), layers, vocab)
        make_adapter(Path(args.make[1]), layers, vocab)
        return
    run_in_workdir(args.workdir, args.keep, lambda: bench(args.workdir, args.size_gb, args.runs), table, "result")

if __name__ == "__main__":
    main()
