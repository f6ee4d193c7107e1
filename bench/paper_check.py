"""Small-scale check of the LoRA and AdaLoRA papers' claims on a real pretrained model (CPU).

Model: SmolLM2-135M-Instruct (see bench/common.py). Data: gensim's lee_background.cor (300 news
documents), packed into --seq-len blocks; a seeded 2 % of the blocks is held out. Every run sees the
same batches in the same order (loratools' data order depends on the seed only) and uses the same
schedule (cosine to lr/10). Reported: trainable parameters, held-out loss at the end, wall time.

Runs, in priority order (the script stops starting new ones once --budget-s is spent and says so):
LoRA r = 1, 2, 4, 8 on (q, v) and on all seven projections; AdaLoRA with the same *final* budget as
LoRA r = 2 and r = 4 (init rank 1.5× the target, as in the paper); full fine-tuning.

    python bench/paper_check.py --steps 30 --json bench/results/paper_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import lee_corpus, machine, smollm_dir  # noqa: E402

from loratools.lm.data import collate, global_batch_indices, load_examples, split_examples, target_tokens  # noqa: E402
from loratools.lm.load import load_causal_lm  # noqa: E402
from loratools.lm.heldout import causal_lm_loss, evaluate  # noqa: E402
from loratools.train.loop import lr_at, train_adapter  # noqa: E402
from loratools.train.config import TrainConfig  # noqa: E402

QV = ("q_proj", "v_proj")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def runs() -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    for r in (8, 2):
        out.append((f"LoRA q,v r={r}", dict(method="lora", rank=r, alpha=2 * r, targets=QV)))
    out.append(("AdaLoRA q,v 6→4", dict(method="adalora", init_rank=6, target_rank=4, alpha=8, targets=QV)))
    out.append(("LoRA q,v r=4", dict(method="lora", rank=4, alpha=8, targets=QV)))
    out.append(("LoRA all r=2", dict(method="lora", rank=2, alpha=4, targets=ALL)))
    out.append(("AdaLoRA all 3→2", dict(method="adalora", init_rank=3, target_rank=2, alpha=4, targets=ALL)))
    out.append(("LoRA q,v r=1", dict(method="lora", rank=1, alpha=2, targets=QV)))
    out.append(("LoRA all r=1", dict(method="lora", rank=1, alpha=2, targets=ALL)))
    out.append(("full fine-tuning", dict(method="full")))
    out.append(("LoRA all r=4", dict(method="lora", rank=4, alpha=8, targets=ALL)))
    out.append(("LoRA all r=8", dict(method="lora", rank=8, alpha=16, targets=ALL)))
    # Λ starts at zero and P, Q at std 0.02, so ∂L/∂Λ is a product of two small factors: AdaLoRA moves
    # far more slowly than LoRA at the same lr. These rows show how much of the gap is just the lr.
    out.append(("AdaLoRA q,v 6→4 lr×10", dict(method="adalora", init_rank=6, target_rank=4, alpha=8, targets=QV,
                                            lr_mult=10)))
    out.append(("LoRA q,v r=4 lr×10", dict(method="lora", rank=4, alpha=8, targets=QV, lr_mult=10)))
    return out


def full_finetune(base: Path, data: Path, *, steps: int, lr: float, batch: int, seq_len: int, seed: int,
                  eval_split: float) -> tuple[int, float]:
    """Every weight trained with AdamW on exactly the batches and schedule the adapters see."""
    torch.manual_seed(seed)
    model, tok = load_causal_lm(base, device=torch.device("cpu"), dtype=torch.float32)
    train_set, held = split_examples(load_examples(data, tok, seq_len=seq_len), eval_split=eval_split, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in {id(p): p for p in params}.values())
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=lr, warmup=0, total=steps)
        ex = [train_set[i] for i in global_batch_indices(step - 1, n=len(train_set), size=batch, seed=seed)]
        b = collate(ex, pad_id=tok.pad_token_id or 0)
        loss = causal_lm_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                              b["labels"]) / target_tokens(ex)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return n_params, evaluate(model, held, batch_size=batch, pad_id=tok.pad_token_id or 0,
                              device=torch.device("cpu"), autocast=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="adapters' learning rate")
    ap.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning's learning rate")
    ap.add_argument("--eval-split", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    ap.add_argument("--budget-s", type=float, default=900.0, help="start no new run after this many seconds")
    ap.add_argument("--only", default="", help="run labels to do, separated by ; (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, data = smollm_dir(), lee_corpus()
    seed = 0
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "args": {k: str(v) for k, v in vars(args).items()}, "runs": [], "skipped": []}

    model, tok = load_causal_lm(base, device=torch.device("cpu"), dtype=torch.float32)
    train_set, held = split_examples(load_examples(data, tok, seq_len=args.seq_len), eval_split=args.eval_split,
                                     seed=seed)
    base_loss = evaluate(model, held, batch_size=args.batch_size, pad_id=tok.pad_token_id or 0,
                         device=torch.device("cpu"), autocast=False)
    del model
    results.update(base_heldout_loss=base_loss, train_sequences=len(train_set), heldout_sequences=len(held),
                   heldout_tokens=target_tokens(held))
    print(f"base held-out loss {base_loss:.4f} on {len(held)} sequences; {len(train_set)} training sequences",
          flush=True)
    t_start = time.perf_counter()
    only = {s.strip() for s in args.only.split(";") if s.strip()}
    for label, spec in runs():
        if only and label not in only:
            continue
        if time.perf_counter() - t_start > args.budget_s:
            results["skipped"].append(label)
            continue
        t = time.perf_counter()
        if spec["method"] == "full":
            n, loss = full_finetune(base, data, steps=args.steps, lr=args.full_lr, batch=args.batch_size,
                                    seq_len=args.seq_len, seed=seed, eval_split=args.eval_split)
            row = {"run": label, "trainable": n, "heldout_loss": loss, "lr": args.full_lr}
        else:
            out = Path(tempfile.mkdtemp()) / "adapter"
            spec = dict(spec)
            lr = args.lr * spec.pop("lr_mult", 1)
            cfg = TrainConfig(**spec, steps=args.steps, lr=lr, batch_size=args.batch_size, seq_len=args.seq_len,
                              eval_split=args.eval_split, eval_every=args.steps, seed=seed, device="cpu")
            res = train_adapter(base, data, out, cfg)
            row = {"run": label, "trainable": res.trainable_parameters, "heldout_loss": res.evals[-1]["eval_loss"],
                   "final_params": res.adapter.parameters, "lr": lr}
            if res.rank_pattern:
                row["final_ranks"] = sorted(sum(v) for v in res.rank_pattern.values())
            shutil.rmtree(out.parent, ignore_errors=True)
        row["seconds"] = round(time.perf_counter() - t, 1)
        row["heldout_ppl"] = math.exp(row["heldout_loss"])
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"done in {results['total_seconds']}s; skipped: {results['skipped'] or 'none'}")


if __name__ == "__main__":
    main()
