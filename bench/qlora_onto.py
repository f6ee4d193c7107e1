"""Which base should a QLoRA adapter be merged onto? (issue "Quantized bases, part 2", points 3, 4 and 6)

Model: SmolLM2-135M-Instruct as a float32 safetensors directory (bench/common.py). Data: gensim's
`lee_background.cor` (300 news documents, one a line): the first 250 train, the last --heldout-docs are held out.

1. Train a LoRA with `loratools.train_adapter(..., TrainConfig(quantize="nf4-dq"))`: every linear layer but the
   head held as bitsandbytes NF4 codes with double-quantized absmax, dequantized in each forward.
2. Held-out loss (token-mean cross-entropy, `loratools.lm.heldout.evaluate`, float32, seq_len 128) of
   (a) the base alone; (a') the NF4 base alone and (b) the NF4 base + the adapter as trained (both `train`'s
   own held-out losses, before the first step and after the last); (c) the adapter merged onto the original
   weights, W0 + ΔW; (d) merged onto the dequantized base, deq(NF4(W0)) + ΔW, for the adapted layers only
   (the others keep W0), in float32.
3. The ratio ‖deq(NF4(W0)) − W0‖_F / ‖ΔW‖_F per adapted module and overall (`loratools inspect --qlora`'s
   `loratools.inspect_job.qlora_file`).
4. Memory (--memory): peak RSS and time per step of `train` on each base of --memory-bases (default: none,
   i.e. float32; none-bfloat16, i.e. `dtype` bfloat16; nf4-dq; int8, i.e. LLM.int8 rows), each run in its own
   process, --memory-repeats times in alternating order (medians reported, every run kept): the whole run's peak
   (ru_maxrss, the model load included) and the training phase's alone (VmHWM reset after the load);
   --memory-env NAME=VALUE sets an environment variable in those runs (glibc's MALLOC_MMAP_THRESHOLD_).

    PYTHONPATH=$PWD python bench/qlora_onto.py --steps 30 --json bench/results/qlora_onto.json
    (--no-memory, then --memory-only with the same --json, to run the two parts apart)
    PYTHONPATH=$PWD python bench/qlora_onto.py --memory-only --memory-repeats 2 --json bench/results/qlora_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import lee_corpus, machine, run_info, smollm_dir  # noqa: E402


SEQ_LEN, BATCH = 64, 2


def split_corpus(root: Path, heldout_docs: int) -> tuple[Path, Path]:
    lines = [ln for ln in lee_corpus().read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    (root / "train.txt").write_text("\n\n".join(lines[:250]) + "\n")
    (root / "heldout.txt").write_text("\n\n".join(lines[-heldout_docs:]) + "\n")
    return root / "train.txt", root / "heldout.txt"


def config(steps: int, targets: str, quantize: str, eval_file: Path, dtype: str = "auto"):
    from loratools.train import TrainConfig

    return TrainConfig(steps=steps, rank=8, alpha=16, targets=targets, lr=1e-3, seq_len=SEQ_LEN, batch_size=BATCH,
                       eval_file=str(eval_file), eval_every=10 ** 6, seed=0, device="cpu", quantize=quantize,
                       dtype=dtype)


def losses(base: Path, adapter_dir: Path, heldout: Path, quant: str) -> dict[str, float]:
    """The held-out losses (a), (c) and (d) of the module docstring."""
    import torch

    from loratools.formats import read_adapter
    from loratools.lm.data import load_examples
    from loratools.lm.heldout import evaluate
    from loratools.lm.load import load_causal_lm
    from loratools.quant.qlora import qlora_dequantized

    adapter = read_adapter(adapter_dir)

    def loss(model) -> float:
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        return evaluate(model, examples, batch_size=4, pad_id=pad, device=torch.device("cpu"), autocast=False)

    def fresh():
        return load_causal_lm(base, frozen=True)[0]

    model, tok = load_causal_lm(base, frozen=True)
    examples = load_examples(heldout, tok, seq_len=SEQ_LEN)
    out = {"a_base": loss(model)}
    for key, onto in (("c_merged_onto_original", "original"), ("d_merged_onto_dequantized", "dequantized")):
        model = fresh()
        with torch.no_grad():
            for name, m in adapter.modules.items():
                w = model.get_submodule(name).weight
                if onto == "dequantized":
                    w.copy_(qlora_dequantized("w", w, quant))
                w.add_(m.delta().to(w.dtype))
        out[key] = loss(model)
    return out


def ratios(base: Path, adapter_dir: Path, quant: str) -> dict[str, object]:
    from loratools.inspect_job import qlora_file

    report = qlora_file(adapter_dir, base=base, quant=quant)
    rows = sorted(report.rows, key=lambda r: r.ratio)
    by_type: dict[str, list[float]] = {}
    for r in rows:
        by_type.setdefault(r.module.rsplit(".", 1)[-1], []).append(r.ratio)
    return {"overall": report.ratio, "favours": report.favours, "modules": len(rows),
            "min": rows[0].ratio, "median": rows[len(rows) // 2].ratio, "max": rows[-1].ratio,
            "median_by_type": {t: sorted(v)[len(v) // 2] for t, v in by_type.items()},
            "quant_error_over_weight_median": sorted(r.quant_error / r.weight for r in rows)[len(rows) // 2],
            "rows": [r.to_json() for r in report.rows]}


def memory_child(base: Path, data: Path, heldout: Path, out: Path, steps: int, targets: str, variant: str) -> None:
    """One `train` run on the base ``variant`` names (a `quantize` value, or none-bfloat16); prints the training
    phase's peak RSS (VmHWM reset when the base's held-out loss is reported, after the load and the quantization)
    and the time per step."""
    from loratools.train import train_adapter

    one = heldout.with_name("heldout-one.txt")  # one document: the eval is not what is measured
    one.write_text(heldout.read_text().split("\n\n")[0] + "\n")

    def on_step(info) -> None:
        if info.step == 0:
            Path("/proc/self/clear_refs").write_text("5")

    quantize = variant.removesuffix("-bfloat16")
    cfg = config(steps, targets, quantize, one, "bfloat16" if variant.endswith("-bfloat16") else "auto")
    result = train_adapter(base, data, out, cfg, on_step=on_step, force=True)
    hwm = next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines()
               if ln.startswith("VmHWM"))
    print(json.dumps({"train_phase_peak_mb": hwm / 1024, "s_per_step": result.seconds / result.steps}))


def memory(root: Path, data: Path, heldout: Path, steps: int, targets: str, bases: list[str],
           repeats: int = 1, env: dict[str, str] | None = None) -> dict[str, object]:
    """Each base of ``bases`` ``repeats`` times, the order reversed every other round, the children run with ``env``
    added to the environment: medians and every run."""
    runs: dict[str, list[dict[str, float]]] = {b: [] for b in bases}
    for i in range(repeats):
        for variant in bases if i % 2 == 0 else bases[::-1]:
            cmd = [sys.executable, __file__, "--child", variant, "--memory-steps", str(steps), "--targets", targets,
                   "--workdir", str(root)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | (env or {}))
            _, status, ru = os.wait4(proc.pid, 0)
            text = proc.stdout.read().decode() if proc.stdout else ""
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit((proc.stderr.read().decode() if proc.stderr else "")[-3000:])
            run = json.loads(text.strip().splitlines()[-1]) | {"run_peak_mb": ru.ru_maxrss / 1024,
                                                               "load1_before": os.getloadavg()[0]}
            runs[variant].append(run)
            print(f"  round {i + 1} {variant}: {run['s_per_step']:.2f} s/step, train phase "
                  f"{run['train_phase_peak_mb']:.0f} MB, run {run['run_peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    keys = ("train_phase_peak_mb", "s_per_step", "run_peak_mb")
    return {b: {k: statistics.median(r[k] for r in rs) for k in keys} | {"runs": rs} for b, rs in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--heldout-docs", type=int, default=8)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--quant", default="nf4-dq")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-bases", default="none,none-bfloat16,nf4-dq,int8")
    ap.add_argument("--memory-repeats", type=int, default=1)
    ap.add_argument("--memory-env", action="append", default=[], metavar="NAME=VALUE",
                    help="set in the memory runs' environment, e.g. MALLOC_MMAP_THRESHOLD_=131072 (glibc then returns "
                         "every freed block over 128 KiB to the system instead of keeping it)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--child")
    args = ap.parse_args()
    base = smollm_dir()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="qlora-onto-"))
    root.mkdir(parents=True, exist_ok=True)
    data, heldout = split_corpus(root, args.heldout_docs)
    if args.child:
        memory_child(base, data, heldout, root / f"mem-{args.child}", args.memory_steps, args.targets, args.child)
        return
    if args.memory_only:  # the memory runs alone, their figures added to --json
        report = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
        report["memory_info"] = run_info()
        env = dict(e.split("=", 1) for e in args.memory_env)
        report["memory"] = memory(root, data, heldout, args.memory_steps, args.targets,
                                  args.memory_bases.split(","), args.memory_repeats, env)
        report["memory_info"] |= {"loadavg_end": os.getloadavg(), "env": env}
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["memory"], indent=2))
        return
    from loratools.train import train_adapter

    t0 = time.perf_counter()
    if not (root / "adapter" / "loss_curve.json").is_file():  # a rerun in the same --workdir reuses the adapter
        train_adapter(base, data, root / "adapter", config(args.steps, args.targets, args.quant, heldout))
    curve = json.loads((root / "adapter" / "loss_curve.json").read_text())
    run = json.loads((root / "adapter" / "training_config.json").read_text())
    report = {"info": run_info() | {"machine": machine()}, "steps": args.steps, "targets": args.targets,
              "quant": args.quant, "seq_len": SEQ_LEN, "batch_size": BATCH, "heldout_docs": args.heldout_docs,
              "train_seconds": run["seconds"], "train_loss_last": curve["train"][-1]["loss"], "evals": curve["eval"],
              "losses": {"a2_nf4_base": curve["eval"][0]["eval_loss"],
                         "b_nf4_plus_adapter": curve["eval"][-1]["eval_loss"]}
              | losses(base, root / "adapter", heldout, args.quant),
              "ratios": ratios(base, root / "adapter", args.quant)}
    if not args.no_memory:
        report["memory"] = memory(root, data, heldout, args.memory_steps, args.targets,
                                  args.memory_bases.split(","), args.memory_repeats)
    report["total_seconds"] = time.perf_counter() - t0
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    short = {k: v for k, v in report.items() if k != "ratios"} | {
        "ratios": {k: v for k, v in report["ratios"].items() if k != "rows"}}  # type: ignore[union-attr]
    print(json.dumps(short, indent=2))


if __name__ == "__main__":
    main()
