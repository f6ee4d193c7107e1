"""Benchmark `convert_file`: what the read-back ΔW check costs next to the write itself.

A synthetic LoRA shaped like SmolLM2-135M's (30 layers, hidden 576, 9 heads / 3 KV
heads, intermediate 1536; r=16 on q,k,v,o,gate,up,down; float32) is written as a
PEFT directory, then converted to each format with `convert_file` (read, convert,
write, read back, check every ΔW, rename) and, for comparison in the same run,
written directly with the format's writer (no check). Median of N runs.

    python bench/convert.py [N]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loratools as lt  # noqa: E402
from loratools.adapter import Adapter, Module  # noqa: E402
from loratools.config import AdapterConfig  # noqa: E402
from loratools.formats.gguf import GGUFBase, write_gguf  # noqa: E402
from loratools.formats.kohya import write_kohya  # noqa: E402

H, I, L, R = 576, 1536, 30, 16
SHAPES = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (192, H), "self_attn.v_proj": (192, H),
          "self_attn.o_proj": (H, H), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}


def make(tmp: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    mods = {f"model.layers.{i}.{n}": Module(A=torch.randn(R, inp, generator=g) / 30, B=torch.randn(out, R, generator=g) / 30,
                                            alpha=32.0, scale=2.0)
            for i in range(L) for n, (out, inp) in SHAPES.items()}
    base = tmp / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 9,
                                                  "num_key_value_heads": 3}))
    src = tmp / "lora"
    lt.write_adapter(Adapter(mods, AdapterConfig(base_model=str(base))), src, format="peft")
    return src


def timed(fn, n: int) -> float:
    runs = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = make(tmp)
        adapter = lt.read_adapter(src)
        print(f"adapter: {len(adapter.modules)} modules, {adapter.parameters:,} parameters; median of {n} runs, "
              f"1 thread, load average {os.getloadavg()}")
        from loratools.deltas import check_same_deltas

        print(f"read the PEFT source {timed(lambda: lt.read_adapter(src), n) * 1e3:7.1f} ms | "
              f"ΔW check of 210 modules {timed(lambda: check_same_deltas(adapter, adapter), n) * 1e3:7.1f} ms")
        writers = {"kohya": lambda p: write_kohya(adapter, p), "gguf": lambda p: write_gguf(adapter, p, base=GGUFBase("llama", 9, 3)),
                   "peft": lambda p: lt.FORMATS["peft"].write(adapter, p)}
        for to, write in writers.items():
            out = tmp / f"out-{to}"
            checked = timed(lambda: lt.convert_file(src, out, to=to, base=tmp / "base", force=True), n)
            k = iter(range(10**6))
            plain = timed(lambda: write(tmp / f"plain-{to}-{next(k)}"), n)
            print(f"{to:6s} convert_file (read+write+read back+check) {checked * 1e3:7.1f} ms | write only {plain * 1e3:7.1f} ms")
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
