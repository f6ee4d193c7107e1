"""Training-step time and peak memory: loratools' LoRA layers vs peft's, same model, data and config.

Each measurement runs in a fresh child process (so peak memory is that implementation's own), the
two implementations alternate, and the step is identical code for both — forward, next-token loss,
backward, gradient clipping, AdamW — only the injected layers differ. Reported: the median step
time over all timed steps of all repeats, and the peak memory during the timed steps (CUDA:
torch.cuda.max_memory_allocated; CPU: the process's peak RSS, VmHWM, reset after warm-up).

    python bench/train_step.py                      # SmolLM2-135M, q,v r=8, batch 4 × 64 tokens
    python bench/train_step.py --model fixtures/tiny-llama --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rss_peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child(impl: str, model_dir: str, steps: int, warmup: int, batch: int, seq_len: int, rank: int,
          device_name: str, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from loratools.device import resolve_device
    from loratools.lm.heldout import causal_lm_loss

    torch.set_num_threads(threads)
    device = resolve_device(device_name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    targets = ["q_proj", "v_proj"]
    if impl == "loratools":
        from loratools.nn.inject import LayerSpec, inject

        inject(model, targets, LayerSpec(rank=rank, alpha=2 * rank))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size if hasattr(model, "config") else 1000
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (batch, seq_len), generator=gen) for _ in range(warmup + steps)]
    autocast = device.type == "cuda"

    def step(ids: torch.Tensor) -> None:
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits
        loss = causal_lm_loss(logits, ids) / ids[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for ids in batches[:warmup]:
        step(ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    times = []
    for ids in batches[warmup:]:
        t = time.perf_counter()
        step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_peak_kib() / 1024)
    return {"impl": impl, "times": times, "peak_mib": peak, "trainable": sum(p.numel() for p in params),
            "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M from bench/common.py)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from common import smollm_dir

        args.model = str(smollm_dir())
    if args.child:
        res = child(args.child, args.model, args.steps, args.warmup, args.batch_size, args.seq_len, args.rank,
                    args.device, args.threads)
        print("RESULT " + json.dumps(res))
        return
    from common import machine

    load_before = os.getloadavg()
    per: dict[str, list[dict]] = {"loratools": [], "peft": []}
    for rep in range(args.repeats):
        for impl in ("loratools", "peft") if rep % 2 == 0 else ("peft", "loratools"):
            cmd = [sys.executable, __file__, "--child", impl, "--model", args.model, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--rank", str(args.rank), "--device", args.device, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
            res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            per[impl].append(res)
            print(f"repeat {rep} {impl}: median {statistics.median(res['times']) * 1e3:.1f} ms, "
                  f"peak {res['peak_mib']:.0f} MiB", flush=True)
    summary = {}
    for impl, rs in per.items():
        times = [t for r in rs for t in r["times"]]
        summary[impl] = {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
                         "max_ms": max(times) * 1e3, "peak_mib": statistics.median(r["peak_mib"] for r in rs),
                         "trainable": rs[0]["trainable"], "device": rs[0]["device"], "n_steps": len(times)}
    ratio = summary["loratools"]["median_ms"] / summary["peft"]["median_ms"]
    mem_ratio = summary["loratools"]["peak_mib"] / summary["peft"]["peak_mib"]
    result = {"machine": machine(), "load_before": load_before, "load_after": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
              "config": {k: v for k, v in vars(args).items() if k not in ("child", "json")},
              "summary": summary, "time_ratio": ratio, "memory_ratio": mem_ratio}
    print(json.dumps(result, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
