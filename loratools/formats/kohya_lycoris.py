"""LyCORIS LoHa and LoKr modules in kohya-style files, read as the LoRA of the rank that holds them exactly.

Keys per module ``<key>`` (LyCORIS 4.1.3 ``lycoris/modules/loha.py``, ``lokr.py``, ``weight_list``):

- LoHa: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·k), ``hada_w2_a``, ``hada_w2_b`` (rank r₂), ``alpha``;
  ΔW = s · (w1a w1b) ⊙ (w2a w2b), s = alpha / r with r = ``hada_w1_b.size(0)``, and alpha 0 or missing
  meaning s = 1 (``LohaModule.__init__``, ``make_module_from_state_dict``; the product is
  ``functional/loha.py`` ``HadaWeight.forward``).
- LoKr: ``lokr_w1`` (a, c) or ``lokr_w1_a`` (a, r) ``lokr_w1_b`` (r, c); ``lokr_w2`` (b, d, *kernel) or
  ``lokr_w2_a`` (b, r) ``lokr_w2_b`` (r, d·k); ``alpha``; ΔW = s · kron(W1, W2) (``functional/lokr.py``
  ``make_kron``), s = alpha / r with r the rank of the decomposed side (``w1_a``'s, else ``w2_a``'s), and
  s = 1 when both sides are full, whatever alpha says (``LokrModule.__init__``: "use scale = 1"). ComfyUI
  (``comfy/weight_adapter/lokr.py``) agrees on every file LyCORIS writes; refused: two factored sides of
  different ranks (ComfyUI takes ``w2_b``'s), a side stored both whole and factored (both runtimes ignore the
  pair), a whole side that is not a matrix, factors of rank 0.

The scale is applied once, as LyCORIS's ``forward`` (and ComfyUI, A1111) apply it: in 4.1.3
``get_diff_weight`` multiplies ``get_weight`` (already scaled) by the scale again, so ``merge_to``
adds s²·ΔW; that path disagrees with LyCORIS's own forward pass and is not followed.

Exact LoRA forms, rank r₁·r₂ (not always the least rank, never an approximation):

- LoHa, with the face-splitting (row-wise Khatri–Rao) product:
  (A₁B₁) ⊙ (A₂B₂) = (A₁ ⊙ᵣ A₂)(B₁ ⊙꜀ B₂), B[i, (k, l)] = w1a[i, k]·w2a[i, l], A[(k, l), j] = w1b[k, j]·w2b[l, j].
- LoKr: kron(B₁A₁, B₂A₂) = kron(B₁, B₂)·kron(A₁, A₂); a full side W is W·I or I·W, whichever is smaller.
  For a convolution, kron(W1, W2 (b, d, *kernel)) flattened to (out, in·k) is kron(W1, W2.reshape(b, -1)).
- LoHa with Tucker cores (``use_tucker`` on a convolution: ``hada_t1``/``hada_t2`` (r, r, kh, kw),
  ``hada_w1_a`` (r, out), ``hada_w1_b`` (r, in); ``functional/loha.py`` ``HadaWeightTucker``: W₁[p, q, …] =
  Σᵢⱼ t₁[i, j, …]·w1b[j, q]·w1a[i, p]): W₁ = B₁A₁ with B₁ = w1aᵀ, A₁[i, (q, …)] = Σⱼ t₁[i, j, …]·w1b[j, q],
  then the face-splitting product as above. (A LoCon ``lora_mid`` core is read by :mod:`.kohya`.)
- LoKr with a Tucker core (``lokr_t2`` (r, r, kh, kw), ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d)): W2 = B₂A₂ with
  B₂ = w2aᵀ and A₂ the core contracted with w2b (:func:`_tucker_side`), then the Kronecker form above; s = alpha / r
  with r the core's rank, LyCORIS's ``lora_dim`` (``LokrModule.__init__``).

DoRA on a LoCon module (``dora_scale`` (out, 1[, 1, …]) beside ``lora_down``/``lora_up``) is read as a DoRA Module
with LyCORIS's ε (:data:`DORA_EPS`, :func:`dora_magnitude`, read by :mod:`.kohya`); DoRA's input-column kind
(``wd_on_out=False``), DoRA on LoHa/LoKr, ``lokr_t1`` and LyCORIS's other kinds are refused by name
(:func:`lycoris_refusal`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LYCORIS_KEYS", "REFUSED_KEYS", "DORA_KEY", "DORA_EPS", "LycorisFactors", "lycoris_refusal",
           "dora_magnitude", "lycoris_factors"]

_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_TUCKER = ("hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
#: tensor names (after ``<key>.``) of the LyCORIS kinds read here
LYCORIS_KEYS = _LOHA + _TUCKER + _LOKR
#: Tucker cores: an entry of the LoRA form is then a sum of products (exact in float64 only)
_CORES = _TUCKER + ("lokr_t2",)
#: a side stored both whole and factored: LyCORIS 4.1.3 (``LokrModule.make_module_from_state_dict``) and ComfyUI
#: (``comfy/weight_adapter/lokr.py``) use the whole one and never read the pair, like a stray tensor
_BOTH_FORMS = ("it holds both lokr_w{n} and lokr_w{n}_a/lokr_w{n}_b, two forms of one Kronecker factor: LyCORIS "
               "4.1.3 and ComfyUI use lokr_w{n} and ignore the pair, so which one was trained is unknown; keep one")

#: LyCORIS 4.1.3 DoRA on LoCon (``modules/locon.py``: ``weight_decompose``, ``wd_on_out``; the rule in
#: ``functional/general.py`` ``_weight_decompose``): W′ = V · dora_scale / (‖V‖ + ε), V = W0 + s·BA (s = alpha/r, as
#: ``get_merged_weight`` and ``forward`` form it), ε = finfo(dora_scale's dtype).eps. With ``wd_on_out`` (the default,
#: and the only kind ``create_network_from_weights`` loads: ``make_module_from_state_dict`` builds the module with it)
#: dora_scale is (out, 1[, 1, …]) and the norm runs over output rows: an Adapter's DoRA with ``dora_eps`` ε. That
#: loader copies the file's dora_scale into the float32 parameter ``LoConModule.__init__`` makes, so ε = 2⁻²³
#: whatever dtype the file stores it in. The network ``multiplier`` (DoRA: mult·(m/(‖V‖+ε) − 1) + 1) is 1: a file
#: holds none, and a merge takes DoRA with weight 1 only.
DORA_KEY = "dora_scale"
DORA_EPS = float(torch.finfo(torch.float32).eps)
_DORA_COLUMNS = ("LyCORIS DoRA with wd_on_out=False (dora_scale of shape (1, in)): it rescales each input column of "
                 "W0 + ΔW by dora_scale / (‖column‖ + ε), where loratools' DoRA rescales output rows, and LyCORIS "
                 "4.1.3's own create_network_from_weights loads only the output-row kind; merge it with a runtime "
                 "that reads it (ComfyUI) and extract a LoRA from the result (loratools extract)")
_DORA_OTHER = ("LyCORIS DoRA on a LoHa/LoKr module (dora_scale beside hada_*/lokr_*), which loratools reads on "
               "LoCon (lora_down/lora_up) modules only; merge it with LyCORIS and extract a LoRA from the result "
               "(loratools extract)")

#: tensor name → (the kind it marks, what to do); first match wins, so DoRA and Tucker come first
_REFUSED: tuple[tuple[tuple[str, ...], str], ...] = (
    (("lokr_t1",),
     "LyCORIS LoKr with a Tucker core on its first factor (lokr_t1), which LyCORIS 4.1.3 lists among LoKr's "
     "tensors but neither creates nor applies (modules/lokr.py): no producer defines its ΔW; retrain it, or merge "
     "it with the tool that wrote it and extract a LoRA (loratools extract)"),
    (("diff", "diff_b"), "LyCORIS full (diff/diff_b, a whole weight, not low-rank): merge it with LyCORIS"),
    (("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"),
     "LyCORIS GLoRA (a1/a2/b1/b2): its update depends on the base weight; merge it with LyCORIS"),
    (("oft_blocks", "rescale"), "LyCORIS OFT/BOFT (oft_blocks, an orthogonal rotation of the base, not an "
                                "added ΔW): merge it with LyCORIS"),
    (("on_input", "weight"), "LyCORIS (IA)³ (weight/on_input, a rescaling of the base): merge it with LyCORIS"),
    (("w_norm", "b_norm"), "LyCORIS norm-layer training (w_norm/b_norm): merge it with LyCORIS"),
    (("q_layer.weight", "p_layer.weight", "lambda_layer"), "LyCORIS T-LoRA (timestep-masked, lambda_layer): "
                                                           "merge it with LyCORIS"),
)
#: tensor names (after ``<key>.``) of the LyCORIS kinds refused by name, and DoRA's (refused in all but one kind)
REFUSED_KEYS = frozenset(k for names, _ in _REFUSED for k in names) | {DORA_KEY}


def lycoris_refusal(keys: set[str], dora_shape: tuple[int, ...] | None = None) -> str | None:
    """Why one module's tensor names (after ``<key>.``) are a LyCORIS kind loratools does not read, or None;
    ``dora_shape`` (``dora_scale``'s) tells DoRA's two kinds apart: (1, in, …) normalises input columns.

    >>> lycoris_refusal({"lokr_w1_a", "lokr_w1_b", "lokr_t1", "lokr_w2", "alpha"})[:26]
    'LyCORIS LoKr with a Tucker'
    >>> lycoris_refusal({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}) is None
    True
    >>> lycoris_refusal({"lora_down.weight", "lora_up.weight", "dora_scale"}, (8, 1)) is None
    True
    """
    if DORA_KEY in keys:
        if dora_shape is not None and len(dora_shape) >= 2 and dora_shape[0] == 1 and dora_shape[1] > 1:
            return _DORA_COLUMNS
        if keys & set(LYCORIS_KEYS):
            return _DORA_OTHER
    for names, why in _REFUSED:
        if keys & set(names):
            return why
    return None


def dora_magnitude(dora_scale: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
    """A LoCon DoRA ``dora_scale`` (out, 1[, 1, …]) as a Module's magnitude (out,); ``weight_shape`` is the base
    weight's (out, in[, *kernel]). Raises ``ValueError`` for any other shape.

    >>> dora_magnitude(torch.ones(3, 1, 1, 1), (3, 2, 3, 3)).shape
    torch.Size([3])
    """
    want = (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    if tuple(dora_scale.shape) != want:
        raise ValueError(f"dora_scale {tuple(dora_scale.shape)} is not one entry per output row {want}")
    return dora_scale.reshape(-1)


class LycorisFactors:
    """One LoHa/LoKr module as LoRA: ΔW (out, in·k) = ``scale`` · ``B`` @ ``A``; ``kernel`` when the file shows it."""

    def __init__(self, A: Tensor, B: Tensor, scale: float, kernel: tuple[int, ...] | None, kind: str) -> None:
        self.A, self.B, self.scale, self.kernel, self.kind = A, B, scale, kernel, kind


def _scale(alpha: float | None, r: int | None) -> float:
    # LyCORIS: `alpha = lora_dim if alpha is None or alpha == 0 else alpha`, then scale = alpha / lora_dim
    if r == 0:
        raise ValueError("its factors are empty (rank 0), and LyCORIS and ComfyUI divide alpha by the rank")
    return 1.0 if r is None or alpha is None or alpha == 0 else alpha / r


def _tucker_half(t: Tensor, wa: Tensor, wb: Tensor) -> tuple[Tensor, Tensor]:
    """(B, A) of one Tucker LoHa half: W[p, q, …] = Σᵢⱼ t[i, j, …]·wb[j, q]·wa[i, p] = (waᵀ A)[p, (q, …)]."""
    if t.ndim < 3 or t.shape[0] != wa.shape[0] or t.shape[1] != wb.shape[0] or wa.ndim != 2 or wb.ndim != 2:
        raise ValueError(f"Tucker factors do not chain: core {tuple(t.shape)}, w_a {tuple(wa.shape)}, "
                         f"w_b {tuple(wb.shape)}")
    A = torch.einsum("ij...,jq->iq...", t, wb).reshape(t.shape[0], -1)
    return wa.T, A


def _loha_tucker(t: dict[str, Tensor], alpha: float | None) -> LycorisFactors:
    w1a, w1b, w2a, w2b, t1, t2 = (t[k].to(torch.float64) for k in _LOHA + _TUCKER)
    if t1.shape[2:] != t2.shape[2:] or w1a.shape[1] != w2a.shape[1] or w1b.shape[1] != w2b.shape[1]:
        raise ValueError("the two LoHa Tucker halves have different shapes")
    B1, A1 = _tucker_half(t1, w1a, w1b)
    B2, A2 = _tucker_half(t2, w2a, w2b)
    B = (B1[:, :, None] * B2[:, None, :]).reshape(B1.shape[0], -1)
    A = (A1[:, None, :] * A2[None, :, :]).reshape(-1, A1.shape[1])
    return LycorisFactors(A, B, _scale(alpha, int(w1b.shape[0])), tuple(int(k) for k in t1.shape[2:]), "LoHa")


def _loha(t: dict[str, Tensor], alpha: float | None) -> LycorisFactors:
    if any(k in t for k in _TUCKER):
        if not all(k in t for k in _TUCKER):
            raise ValueError("a LoHa Tucker module needs both hada_t1 and hada_t2")
        return _loha_tucker(t, alpha)
    w1a, w1b, w2a, w2b = (t[k].to(torch.float64) for k in _LOHA)
    if w1a.ndim != 2 or w2a.ndim != 2 or w1b.ndim != 2 or w2b.ndim != 2:
        raise ValueError("LoHa factors must be matrices")
    if w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1] \
            or w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
        raise ValueError(f"LoHa factor shapes do not chain: {tuple(w1a.shape)}, {tuple(w1b.shape)}, "
                         f"{tuple(w2a.shape)}, {tuple(w2b.shape)}")
    B = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    A = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return LycorisFactors(A, B, _scale(alpha, int(w1b.shape[0])), None, "LoHa")


def _side(t: dict[str, Tensor], n: str) -> tuple[Tensor, Tensor, int | None, tuple[int, ...]]:
    """(B, A, rank when decomposed, kernel) of one Kronecker factor, W = B @ A exactly."""
    full, a, b = t.get(f"lokr_w{n}"), t.get(f"lokr_w{n}_a"), t.get(f"lokr_w{n}_b")
    if full is not None and (a is not None or b is not None):
        raise ValueError(_BOTH_FORMS.format(n=n))
    if n == "2" and "lokr_t2" in t:
        return _tucker_side(t, full)
    if full is not None:
        if full.ndim < 2:  # torch.kron (ComfyUI) reads a vector as a row, a reshape as a column: no one ΔW
            raise ValueError(f"lokr_w{n} of shape {tuple(full.shape)} is not a matrix")
        W = full.to(torch.float64)
        kernel = tuple(int(s) for s in W.shape[2:])
        W = W.reshape(W.shape[0], -1)
        rows, cols = W.shape
        # W = I·W or W·I: the smaller identity gives the smaller rank
        if rows <= cols:
            return torch.eye(rows, dtype=W.dtype), W, None, kernel
        return W, torch.eye(cols, dtype=W.dtype), None, kernel
    if a is None or b is None:
        raise ValueError(f"LoKr needs lokr_w{n} or both lokr_w{n}_a and lokr_w{n}_b")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"lokr_w{n}_a {tuple(a.shape)} and lokr_w{n}_b {tuple(b.shape)} do not chain")
    return a.to(torch.float64), b.to(torch.float64), int(a.shape[1]), ()


def _tucker_side(t: dict[str, Tensor], full: Tensor | None) -> tuple[Tensor, Tensor, int | None, tuple[int, ...]]:
    """LoKr's second factor with a Tucker core (LyCORIS 4.1.3 ``modules/lokr.py`` ``use_tucker`` on a convolution:
    ``lokr_t2`` (r, r, kh, kw), ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d); ``functional/lokr.py`` ``_kron_weight``
    → ``functional/general.py`` ``rebuild_tucker``: W2[p, q, …] = Σᵢⱼ t2[i, j, …]·w2a[i, p]·w2b[j, q]) as
    B = w2aᵀ, A[i, (q, …)] = Σⱼ t2[i, j, …]·w2b[j, q]: exact, rank r, the kernel from the core."""
    if full is not None:  # LyCORIS applies lokr_t2 only when the second factor is decomposed
        raise ValueError("lokr_t2 beside a full lokr_w2 (LyCORIS uses the core only with lokr_w2_a/lokr_w2_b)")
    a, b, core = t.get("lokr_w2_a"), t.get("lokr_w2_b"), t["lokr_t2"]
    if a is None or b is None:
        raise ValueError("a LoKr Tucker core (lokr_t2) needs lokr_w2_a and lokr_w2_b")
    B, A = _tucker_half(core.to(torch.float64), a.to(torch.float64), b.to(torch.float64))
    return B.contiguous(), A, int(core.shape[0]), tuple(int(k) for k in core.shape[2:])


def _lokr(t: dict[str, Tensor], alpha: float | None) -> LycorisFactors:
    B1, A1, r1, k1 = _side(t, "1")
    B2, A2, r2, k2 = _side(t, "2")
    if k1:
        raise ValueError("lokr_w1 must be a matrix (LyCORIS puts the kernel in lokr_w2)")
    if r1 is not None and r2 is not None and r1 != r2:
        raise ValueError(f"its two Kronecker factors are decomposed with different ranks ({r1} and {r2}): LyCORIS "
                         "4.1.3 scales by alpha / the first's (and cannot load it), ComfyUI by alpha / the second's")
    r = r1 if r1 is not None else r2
    scale = 1.0 if r is None else _scale(alpha, r)
    return LycorisFactors(torch.kron(A1, A2), torch.kron(B1, B2), scale, k2 or None, "LoKr")


def lycoris_factors(tensors: dict[str, Tensor], alpha: float | None) -> LycorisFactors:
    """The exact LoRA form of one LoHa or LoKr module from its tensors (names after ``<key>.``).

    Factors come back in float32 when the file's are 16-bit, else float64: the dtype where each entry
    (a product of two stored numbers) is exact.

    ``alpha`` is the file's value (None when absent). Raises ``ValueError`` (with the reason) for factors
    that do not fit together.

    >>> t = {"lokr_w1": torch.eye(2), "lokr_w2": torch.ones(3, 4)}
    >>> f = lycoris_factors(t, 8.0)  # both sides full: LyCORIS's scale is 1
    >>> f.scale, tuple(f.B.shape), tuple(f.A.shape)
    (1.0, (6, 6), (6, 8))
    >>> bool(torch.equal(f.B @ f.A, torch.kron(t["lokr_w1"], t["lokr_w2"]).double()))
    True
    """
    if any(k in tensors for k in _LOHA):
        missing = [k for k in _LOHA if k not in tensors]
        if missing:
            raise ValueError(f"a LoHa module needs {', '.join(missing)}")
        f = _loha(tensors, alpha)
    else:
        f = _lokr(tensors, alpha)
    if 0 in (*f.A.shape[:2], f.B.shape[0]):  # e.g. a whole side with no rows
        raise ValueError(f"its factors are empty (rank {f.A.shape[0]}, ΔW {f.B.shape[0]}×{f.A.shape[1]})")
    # each entry is a product of two stored values: exact in float32 for 16-bit factors, else in float64
    # (a Tucker core makes each entry a sum of products: float64 then)
    half = not any(k in tensors for k in _CORES) and all(t.dtype.itemsize <= 2 for k, t in tensors.items()
                                                          if k in LYCORIS_KEYS)
    if half:
        f.A, f.B = f.A.to(torch.float32), f.B.to(torch.float32)
    return f
