"""Start-up and adapter-reading costs of the CLI, timed as a user meets them.

Each path runs as a child process, in alternating order (one run of every path per round);
reported: median wall time, median CPU (the child's user + system, from ``os.wait4``).

  help            loratools --help
  sub-help        loratools merge --help   (every subcommand's help costs the same: click only)
  import-torch    python -c "import torch"  (the floor of any command that computes)
  inspect-fixture loratools inspect fixtures/adapters/lora
  read-7b         python -c "read every tensor of the 7B-shaped adapter with safetensors" (the floor
                  of any command that reads that adapter)
  inspect-7b      loratools inspect ADAPTER_7B
  resize-7b       loratools resize ADAPTER_7B -o OUT --rank 16

The 7B-shaped adapter is a PEFT LoRA of rank 64 on q, k, v, o, gate, up, down of 32 Llama-7B blocks
(hidden 4096, MLP 11008), float32 random factors: 224 modules, 160 M parameters, 640 MB. It is made
once under --workdir by a child process.

    python bench/startup.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
HIDDEN, INTER, LAYERS, RANK = 4096, 11008, 32, 64

MAKE = f"""
import json, sys, torch
from safetensors.torch import save_file
out = sys.argv[1]
g = torch.Generator().manual_seed(0)
shapes = {{"q_proj": ({HIDDEN}, {HIDDEN}), "k_proj": ({HIDDEN}, {HIDDEN}), "v_proj": ({HIDDEN}, {HIDDEN}),
          "o_proj": ({HIDDEN}, {HIDDEN}), "gate_proj": ({INTER}, {HIDDEN}), "up_proj": ({INTER}, {HIDDEN}),
          "down_proj": ({HIDDEN}, {INTER})}}
t = {{}}
for i in range({LAYERS}):
    for name, (o, n) in shapes.items():
        part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = f"base_model.model.model.layers.{{i}}.{{part}}.{{name}}"
        t[key + ".lora_A.weight"] = torch.randn({RANK}, n, generator=g) / n ** 0.5
        t[key + ".lora_B.weight"] = torch.randn(o, {RANK}, generator=g) * 0.01
save_file(t, out + "/adapter_model.safetensors")
json.dump({{"peft_type": "LORA", "r": {RANK}, "lora_alpha": {2 * RANK}, "target_modules": list(shapes),
           "task_type": "CAUSAL_LM"}}, open(out + "/adapter_config.json", "w"))
"""

READ = "import sys; from safetensors.torch import load_file; load_file(sys.argv[1] + '/adapter_model.safetensors')"


def run(cmd: list[str], cwd: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lt-startup"))
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    work = args.workdir
    adapter = work / "adapter-7b"
    if not (adapter / "adapter_model.safetensors").is_file():
        adapter.mkdir(parents=True, exist_ok=True)
        subprocess.run([PY, "-c", MAKE, str(adapter)], check=True)
    lt = [PY, "-m", "loratools"]
    paths = {
        "help": lt + ["--help"],
        "sub-help": lt + ["merge", "--help"],
        "import-torch": [PY, "-c", "import torch"],
        "inspect-fixture": lt + ["inspect", "fixtures/adapters/lora"],
        "read-7b": [PY, "-c", READ, str(adapter)],
        "inspect-7b": lt + ["inspect", str(adapter)],
        "resize-7b": lt + ["-q", "resize", str(adapter), "-o", str(work / "resized"), "--rank", "16", "--force"],
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
    for _ in range(args.runs):
        for name, cmd in paths.items():
            times[name].append(run(cmd, ROOT))
    rows = {k: {"wall": statistics.median(w for w, _ in v), "cpu": statistics.median(c for _, c in v)}
            for k, v in times.items()}
    print(f"{'path':<16} {'wall s':>8} {'cpu s':>8}")
    for k, r in rows.items():
        print(f"{k:<16} {r['wall']:>8.3f} {r['cpu']:>8.3f}")
    ratio = {"inspect-fixture / import-torch": rows["inspect-fixture"]["wall"] / rows["import-torch"]["wall"],
             "inspect-7b / read-7b": rows["inspect-7b"]["wall"] / rows["read-7b"]["wall"],
             "resize-7b / read-7b": rows["resize-7b"]["wall"] / rows["read-7b"]["wall"]}
    for k, v in ratio.items():
        print(f"{k}: {v:.2f}× (wall)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratio, "runs": args.runs}, indent=2) + "\n")
    shutil.rmtree(work / "resized", ignore_errors=True)


if __name__ == "__main__":
    main()
