"""What each serving runtime accepts, as data: one frozen table of rules per runtime.

A :class:`Rule` says what the runtime does with an adapter file (``why``), what
``loratools export`` does about it (``fix``), and where the fact comes from
(``source``: the runtime's version and file, read for this table). A rule that
no longer holds in newer releases carries ``until``, the last version it was
read in. The checks that find each rule's offenders live in
:mod:`loratools.serve.check`; ``docs/runtimes.md`` explains every rule at length (a
test keeps the two in step).

Facts read, not guessed: vLLM 0.34.0 (first read in 0.33.0; 0.31.0/0.32.0 where they differ) and
SGLang 0.5.23 (first read in 0.5.10.post1) from their PyPI wheels; llama.cpp's ``src/llama-adapter.cpp``
and ``llama-adapter.h`` (master, commits fdfa89f and d66c5cd) and the llama.cpp that the llama-cpp-python
0.3.36 sdist vendors (activated LoRA: ``convert_lora_to_gguf.py``, ``tools/server/server-context.cpp``);
Ollama v0.33.0-rc2 (``docs/modelfile.mdx``, ``convert/convert.go``, ``server/create.go``,
``llm/llama_server.go``), which runs llama.cpp b10488.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import InvalidOptionError

__all__ = ["Rule", "Runtime", "RUNTIMES", "get_runtime", "VLLM_MAX_LORA_RANKS", "SGLANG_TARGETS", "is_vision_module",
           "version_tuple"]

#: vLLM's ``--max-lora-rank`` choices (vllm/config/lora.py ``MaxLoRARanks``, 0.31.0–0.34.0; default 16)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: module name suffixes SGLang can put a LoRA on (sglang/srt/utils/common.py ``SUPPORTED_LORA_TARGET_MODULES``)
SGLANG_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                            "gate_up_proj", "embed_tokens", "lm_head"})
# the vision (and audio) towers and their connectors of vision-language models, by the names transformers gives them
_VISION = re.compile(r"(^|\.)(vision_tower|vision_model|visual|vision_encoder|image_encoder|vision_embed_tokens|"
                     r"multi_modal_projector|mm_projector|vision_projection|audio_tower)(\.|$)")


def is_vision_module(name: str) -> bool:
    """True for a module of a vision/audio tower or its projector (``model.vision_tower.encoder.layers.0.q_proj``)."""
    return _VISION.search(name) is not None


def version_tuple(v: str) -> tuple[int, ...]:
    """``"0.31.0"`` → ``(0, 31, 0)``; non-numeric tails (``rc1``, ``.post1``) are ignored."""
    out = []
    for part in v.split("."):
        digits = re.match(r"\d+", part)
        if not digits:
            break
        out.append(int(digits.group()))
    return tuple(out)


@dataclass(frozen=True)
class Rule:
    """One thing a runtime does with an adapter file that can make it refuse it or compute another ΔW."""

    id: str
    why: str
    fix: str
    source: str
    until: str | None = None  # the last version where it holds; None: it holds in the version read


@dataclass(frozen=True)
class Runtime:
    """A serving runtime: its rules, and what it does with a file as fields that ``check`` and ``export`` read
    (they never branch on a runtime's name; a new runtime is a new row).

    - ``writes``: the format ``export`` writes (``"peft"``: a PEFT directory; ``"gguf"``: a GGUF adapter);
    - ``max_lora_ranks``: the allowed ``--max-lora-rank`` values, None when any integer is (or no flag);
    - ``rank_flag``: the server is started with ``--max-lora-rank R`` and refuses a module of rank > R;
    - ``scales``: ``"one"``: one scale ``lora_alpha / r`` (``/ √r`` with ``reads_rslora``) for every module,
      from the config (the rule ``one-scale`` says up to which version, see :attr:`one_scale_until`);
      ``"alpha/rank"``: one alpha for the file, each tensor's scale ``alpha / rank``;
    - ``whole_heads``: last name components of full weights it loads whole (vLLM: a classifier head);
    - ``targets``: last name components it has a LoRA layer for; None: any linear or embedding layer;
    - ``base_tensors``: every module must be a tensor of the base model's GGUF (llama.cpp's names);
    - ``one_rank``: every module must have the config's ``r`` (export pads with zeros);
    - ``stacks_qkv``: q/k/v and gate/up are stacked per layer (export adds zero members);
    - ``target_list``: ``target_modules`` must be a list of names, not a pattern;
    - ``modelfile``: export writes a directory with ``adapter.gguf`` and a ``Modelfile``;
    - ``activated_lora``: it reads peft's ``alora_invocation_tokens`` (llama.cpp: as GGUF metadata) and export
      keeps them; elsewhere an aLoRA is refused;
    - ``expert_lora``: export may write LoRA on mixture-of-experts expert tensors (peft ``target_parameters``);
      False where loratools has not checked the runtime's layout for them (refused, or dropped);
    - ``config_ranks``: the fields of a PEFT config whose ranks must fit ``--max-lora-rank`` beside the tensors'
      (vLLM: ``r`` and every ``rank_pattern`` value, even one that matches no module; SGLang: ``r``);
    - ``strict_config``: it reads the config into a typed record: ``r``, ``lora_alpha`` and ``target_modules``
      must be present and ``bias`` the string ``"none"`` (null is refused) (vLLM 0.32.0
      ``vllm/lora/peft_helper.py``: ``PEFTHelper.from_dict``, ``validate_legal``);
    - ``serve_hint``: how to serve the export, with ``{rank}`` (the smallest ``--max-lora-rank``) and ``{output}``.

    >>> get_runtime("vllm").one_scale_until, get_runtime("sglang").one_scale_until
    ('0.31.0', None)
    """

    name: str
    title: str
    version: str
    writes: str
    rules: tuple[Rule, ...]
    max_lora_ranks: tuple[int, ...] | None = None
    rank_flag: bool = False
    scales: str = "one"
    reads_rslora: bool = False
    whole_heads: tuple[str, ...] = ()
    targets: frozenset[str] | None = None
    base_tensors: bool = False
    one_rank: bool = False
    stacks_qkv: bool = False
    target_list: bool = False
    modelfile: bool = False
    activated_lora: bool = False
    expert_lora: bool = True
    config_ranks: tuple[str, ...] = ()
    strict_config: bool = False
    serve_hint: str = ""

    def rule(self, rule_id: str) -> Rule:
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)

    @property
    def one_scale_until(self) -> str | None:
        """The last version that reads one scale for every module, when newer ones read the patterns as PEFT
        does; None when every version reads one scale (or none does)."""
        return next((r.until for r in self.rules if r.id == "one-scale"), None)


#: what export does with DoRA, for every runtime without DoRA
_DORA_FIX = ("folded into plain LoRA with the base's weights (`base`): each module's full update W′ − W0 factored "
             "by a truncated SVD at `error` and/or `max_lora_rank` (as `convert --as-lora`), its error reported")
_DORA_WHY = ("DoRA's update diag(m/‖W0 + s·BA‖)·(W0 + s·BA) − W0 is not a low-rank ΔW; {title} has no DoRA "
             "layer and {does}.")

_V = "vLLM 0.34.0"
VLLM = Runtime("vllm", "vLLM", "0.34.0", "peft", (
    Rule("peft-directory",
         "vLLM loads a PEFT directory: adapter_config.json beside adapter_model.safetensors (or .bin/.pt).",
         "written as a PEFT directory",
         f"{_V} vllm/lora/lora_model.py (LoRAModel.from_local_checkpoint)"),
    Rule("plain-lora-keys",
         "Only `lora_A.weight`/`lora_B.weight` and `lora_embedding_A`/`lora_embedding_B` keys are LoRA weights; "
         "anything else fails with '… is unsupported LoRA weight' — AdaLoRA's `lora_A`/`lora_B`/`lora_E` included.",
         "AdaLoRA becomes plain LoRA with the same ΔW (rows with Λ ≠ 0; rank-0 modules add nothing and are left out)",
         f"{_V} vllm/lora/utils.py (parse_fine_tuned_lora_name)"),
    Rule("full-tensors",
         "Full tensors (modules_to_save such as lm_head/embed_tokens, biases) are refused: only a classifier/score "
         "head of a classification model may be saved whole, and `bias` must be 'none'.",
         "each full weight becomes a LoRA of W_saved − W_base at `error` (needs `base` with weights), or is "
         "dropped and listed with `drop_unsupported`; `.base_layer.weight` copies of the base are dropped",
         f"{_V} vllm/lora/peft_helper.py (PEFTHelper._validate_features, validate_legal)"),
    Rule("peft-features",
         "Adapters whose config sets lora_bias, a base-rewriting init_lora_weights (pissa, olora, corda, loftq), "
         "alora_invocation_tokens, layer_replication, use_bdlora or use_qalora are refused.",
         "none: export refuses (the adapter means something a plain LoRA cannot express)",
         f"{_V} vllm/lora/peft_helper.py (PEFTHelper._validate_features)"),
    Rule("dora",
         _DORA_WHY.format(title="vLLM", does="refuses use_dora ('vLLM does not yet support DoRA.')"),
         _DORA_FIX, f"{_V} vllm/lora/peft_helper.py (PEFTHelper._validate_features)"),
    Rule("lora-ga-not-converted",
         "vLLM 0.34 accepts init_lora_weights='lora_ga' (its comment: lora_ga 'modifies the base weights only during "
         "training'), but peft 0.21.2's lora_ga_init subtracts s·B₀A₀ from every targeted base weight before "
         "training, so an adapter saved without path_initial_model_for_weight_conversion is relative to that "
         "rewritten base: served on the original base every targeted layer is off by s·B₀A₀, silently.",
         "none: loratools refuses the adapter (B₀A₀ is not in the file); convert it with peft's "
         "path_initial_model_for_weight_conversion, then export",
         f"{_V} vllm/lora/peft_helper.py (PEFTHelper._init_is_supported); peft 0.21.2 peft/tuners/lora/layer.py "
         "(LoraLayer.lora_ga_init: 'W_new = W_old - scaling * (B @ A)')"),
    Rule("max-lora-rank",
         "Every module's rank must be ≤ --max-lora-rank (one of 1, 8, 16, 32, 64, 128, 256, 320, 512; default 16); "
         "the buffers are that wide for every adapter, so a larger setting than needed costs memory and speed.",
         "with `max_lora_rank` and/or `budget`: every module's rank chosen together for the least total "
         "‖ΔW − ΔW′‖²_F (exact spectra from the factors)",
         f"{_V} vllm/config/lora.py (MaxLoRARanks), vllm/lora/peft_helper.py (validate_legal), "
         "vllm/lora/layers/base_linear.py (create_lora_weights)"),
    Rule("one-scale",
         "vLLM ≤ 0.31.0 computes ONE scale for every module from `r`, `lora_alpha` and `use_rslora` "
         "(alpha/r or alpha/√r) and does not read rank_pattern/alpha_pattern: modules whose own scale differs are "
         "silently mis-scaled. vLLM 0.32.0+ reads both patterns as PEFT does.",
         "every module's exact scale folded into its lora_B so that all modules share one scale; the written "
         "patterns then agree with the global rule in every vLLM version",
         "vLLM 0.31.0 vllm/lora/peft_helper.py (PEFTHelper.__post_init__), vllm/lora/lora_weights.py "
         "(LoRALayerWeights.from_config); 0.32.0+ PEFTHelper.get_rank_and_scaling",
         until="0.31.0"),
    Rule("linear-modules",
         "vLLM puts LoRA on linear layers and on the embedding modules a model declares (Llama: embed_tokens, "
         "lm_head); a module of another kind is refused as unexpected.",
         "conv modules are refused, or dropped and listed with `drop_unsupported`",
         f"{_V} vllm/lora/utils.py (get_supported_lora_modules), vllm/lora/lora_model.py "
         "(check_unexpected_modules)"),
    Rule("vision-tower",
         "Modules of a vision tower or its connector get no LoRA layer unless the server runs with "
         "--enable-tower-connector-lora (experimental, some models): their ΔW is silently not applied.",
         "vision-tower modules are dropped and listed",
         f"{_V} vllm/lora/model_manager.py (_create_lora_modules, _get_punica_wrapper), vllm/config/lora.py "
         "(enable_tower_connector_lora)"),
), max_lora_ranks=VLLM_MAX_LORA_RANKS, rank_flag=True, reads_rslora=True, whole_heads=("classifier", "score"),
   config_ranks=("r", "rank_pattern"), strict_config=True, serve_hint="--max-lora-rank {rank}")

_S = "SGLang 0.5.10.post1"
_S23 = "SGLang 0.5.23"
SGLANG = Runtime("sglang", "SGLang", "0.5.23", "peft", (
    Rule("peft-directory",
         "SGLang loads a PEFT directory (adapter_config.json + weights).",
         "written as a PEFT directory",
         f"{_S} sglang/srt/lora/lora_config.py (LoRAConfig.get_lora_config), lora.py (initialize_weights)"),
    Rule("plain-lora-keys",
         "The adapter's peft_type must be LORA (an assertion): AdaLoRA is refused.",
         "AdaLoRA becomes plain LoRA with the same ΔW",
         f"{_S} sglang/srt/lora/lora.py (LoRAAdapter.__init__)"),
    Rule("one-scale",
         "SGLang computes ONE scale, lora_alpha / r, for every module: use_rslora, rank_pattern and alpha_pattern "
         "are never read, so rsLoRA and per-module alphas are silently mis-scaled.",
         "every module's exact scale folded into lora_B; written with use_rslora false and one alpha",
         f"{_S} sglang/srt/lora/lora.py (LoRAAdapter.__init__: scaling = lora_alpha / r)"),
    Rule("uniform-rank",
         "Every module is copied into a buffer slice of the config's `r` columns (shapes asserted equal): a module "
         "whose rank differs from `r` fails to load.",
         "modules of lower rank are padded with zero rows/columns to the common rank (ΔW unchanged)",
         f"{_S} sglang/srt/lora/mem_pool.py (load_lora_weight_to_buffer)"),
    Rule("max-lora-rank",
         "`r` must be ≤ --max-lora-rank (any integer; inferred from the adapters when not given).",
         "with `max_lora_rank` and/or `budget`: every module's rank chosen together for the least total "
         "‖ΔW − ΔW′‖²_F",
         f"{_S} sglang/srt/lora/mem_pool.py (LoRAMemoryPool.can_support), server_args.py (--max-lora-rank)"),
    Rule("target-modules",
         "LoRA goes only on q/k/v/o_proj, gate/up/down_proj (or fused qkv_proj/gate_up_proj), embed_tokens and "
         "lm_head, matched by the last name component; target_modules must be a list (or 'all-linear').",
         "other modules are refused, or dropped and listed with `drop_unsupported`; target_modules written as a list",
         f"{_S} sglang/srt/utils/common.py (SUPPORTED_LORA_TARGET_MODULES), sglang/srt/lora/utils.py "
         "(_KNOWN_LORA_TARGET_MODULES), lora_manager.py (init_lora_shapes)"),
    Rule("stacked-qkv",
         "q, k and v are stacked per layer (and gate with up): a layer whose k or v is adapted but not q, or whose "
         "q is adapted but not v, fails to load; an up_proj without gate_proj is not loaded. A missing k (or up) is "
         "zero-filled.",
         "zero LoRA modules are added for the missing q/v/gate (ΔW unchanged; shapes from siblings or `base`)",
         f"{_S} sglang/srt/lora/lora.py (normalize_qkv_proj, normalize_gate_up_proj)"),
    Rule("full-tensors",
         "Full tensors are not read as replacements: lm_head/embed_tokens weights land in the LoRA buffers or are "
         "skipped, others are taken for lora_B — the adapter's full weights are lost or misread.",
         "each full weight becomes a LoRA of W_saved − W_base at `error` (needs `base` with weights), or is "
         "dropped and listed with `drop_unsupported`; `.base_layer.weight` copies of the base are dropped",
         f"{_S} sglang/srt/lora/lora.py (_process_weight), mem_pool.py (load_lora_weight_to_buffer)"),
    Rule("vision-tower",
         "A weight's layer is the first 'layers.N' in its name, so a vision tower's layer N is loaded into the "
         "language model's layer N: its ΔW lands on the wrong weights.",
         "vision-tower modules are dropped and listed",
         f"{_S} sglang/srt/lora/lora.py (_process_weight), sglang/srt/layers/utils/common.py (get_layer_id)"),
    Rule("peft-features",
         "SGLang reads only peft_type, target_modules, r, lora_alpha and use_dora of the config: lora_bias, a "
         "base-rewriting init_lora_weights, alora_invocation_tokens, layer_replication, use_bdlora and use_qalora "
         "are never read, so such an adapter loads and is applied as a plain LoRA on every token, silently wrong.",
         "none: export refuses (the adapter means something a plain LoRA cannot express)",
         f"{_S23} sglang/srt/lora/lora_config.py (LoRAConfig.__init__); none of those fields is read in sglang/srt"),
    Rule("dora",
         _DORA_WHY.format(title="SGLang", does="refuses use_dora ('LoRA serving currently doesn't support DoRA "
                          "adapters')"),
         _DORA_FIX, f"{_S23} sglang/srt/lora/lora_manager.py (LoRAManager.validate_new_adapter)"),
    Rule("moe-experts",
         "SGLang 0.5.23 serves LoRA on mixture-of-experts layers: weights whose name holds '.experts.' (one tensor "
         "per expert, `experts.N.<proj>`, or a 3-D `experts.<proj>` with the expert dimension first) go to the "
         "gate_up_proj_moe/down_proj_moe buffers, stacked per its MoE runner; loratools has not checked that layout "
         "against peft's target_parameters tensors.",
         "LoRA on expert tensors (peft target_parameters) is refused, or dropped and listed with `drop_unsupported`",
         f"{_S23} sglang/srt/lora/lora.py (_ROUTED_EXPERT_PATTERN, LoRAAdapter._is_non_gated_moe_weight), "
         "sglang/srt/lora/utils.py (get_hidden_dim: gate_up_proj_moe, down_proj_moe)"),
), rank_flag=True, targets=SGLANG_TARGETS, one_rank=True, stacks_qkv=True, target_list=True, expert_lora=False,
   config_ranks=("r",), serve_hint="--max-lora-rank {rank}")

_L = "llama.cpp src/llama-adapter.cpp (master at fdfa89f), src/llama-adapter.h (master at d66c5cd)"
_LLAMA_CPP_RULES = (
    Rule("gguf-file",
         "llama.cpp loads a GGUF adapter: general.type = adapter, adapter.type = lora, general.architecture equal "
         "to the model's, `<tensor>.lora_a`/`.lora_b` pairs.",
         "written as a GGUF adapter (the `convert --to gguf` writer, q/k rows permuted as llama.cpp's converter "
         "permutes the base)",
         f"{_L} (llama_adapter_lora_init_impl)"),
    Rule("one-alpha",
         "One adapter.lora.alpha for the file and each tensor's rank from its shape: the scale is alpha/rank "
         "per tensor, so rsLoRA, rank_pattern and alpha_pattern cannot be written as such.",
         "every module's exact scale folded into lora_b (α = the most common scale·rank)",
         f"{_L} (llama_adapter_lora_weight::get_scale)"),
    Rule("plain-lora-keys",
         "Only `.lora_a`/`.lora_b` tensors (and ignored `_norm.weight`): any other suffix stops the load.",
         "AdaLoRA becomes plain LoRA with the same ΔW",
         f"{_L} (llama_adapter_lora_init_impl: 'has unexpected suffix')"),
    Rule("full-tensors",
         "Full tensors (modules_to_save, biases) cannot be held: only lora_a/lora_b pairs.",
         "each full weight becomes a LoRA of W_saved − W_base at `error` (needs `base` with weights), or is "
         "dropped and listed with `drop_unsupported`",
         f"{_L} (llama_adapter_lora_init_impl)"),
    Rule("tensor-exists",
         "Every adapted tensor must exist in the base model ('does not exist in base model'): no `output` on a "
         "base with tied embeddings, no vision tensors (they live in the separate mmproj file), no conv layers; "
         "loratools maps the Llama family's names only.",
         "modules without a llama.cpp tensor are refused, or dropped and listed with `drop_unsupported`; "
         "vision-tower modules are dropped and listed",
         f"{_L} (llama_adapter_lora_init_impl); names: gguf-py TensorNameMap (MODEL_ARCH.LLAMA)"),
    Rule("dora",
         _DORA_WHY.format(title="llama.cpp", does="loads only .lora_a/.lora_b pairs (a magnitude tensor stops the "
                          "load: 'has unexpected suffix')"),
         _DORA_FIX, f"{_L} (llama_adapter_lora_init_impl: 'has unexpected suffix')"),
)
_LA = "llama.cpp vendored in llama-cpp-python 0.3.36"
LLAMA_CPP = Runtime("llama.cpp", "llama.cpp", "master (fdfa89f)", "gguf", (
    *_LLAMA_CPP_RULES,
    Rule("activated-lora",
         "An activated LoRA (peft alora_invocation_tokens) is read from the GGUF key adapter.alora.invocation_tokens "
         "(an array of uint32; another type stops the load). llama-server applies it only from the last occurrence "
         "of those tokens in the prompt on (one aLoRA per request); libllama itself (llama-cli, node-llama-cpp, "
         "llama-cpp-python) applies it to every token.",
         "the invocation tokens written as adapter.alora.invocation_tokens (uint32 array, as llama.cpp's converter "
         "writes peft's field); serve it with llama-server",
         f"{_LA} src/llama-adapter.cpp (llama_adapter_lora_init_impl: 'parse alora invocation sequence vector'), "
         "convert_lora_to_gguf.py (set_gguf_parameters), tools/server/server-context.cpp (alora_invocation_start)"),
), scales="alpha/rank", base_tensors=True, activated_lora=True, serve_hint="--lora {output}")

_O = "Ollama v0.33.0-rc2"
OLLAMA = Runtime("ollama", "Ollama", "0.33.0-rc2", "gguf", (
    Rule("modelfile",
         "An adapter is applied with `ADAPTER <path>` in a Modelfile whose FROM is the base model; one adapter per "
         "model. The GGUF adapter is handed to llama.cpp (`--lora`), so llama.cpp's rules hold.",
         "writes adapter.gguf and a Modelfile (FROM the base, ADAPTER ./adapter.gguf) in the output directory",
         f"{_O} docs/modelfile.mdx (ADAPTER), server/create.go (errOnlyOneAdapterSupported), llm/llama_server.go"),
    Rule("safetensors-import",
         "A safetensors adapter is converted by Ollama itself only for llama and gemma2 bases, with ONE integer "
         "lora_alpha and each tensor's rank (use_rslora, rank_pattern and alpha_pattern are not read); loratools "
         "has not checked that conversion's q/k handling against llama.cpp.",
         "writes a GGUF adapter instead (checked in llama.cpp by the tests)",
         f"{_O} convert/convert.go (AdapterParameters, ConvertAdapter), convert/convert_llama_adapter.go"),
    *_LLAMA_CPP_RULES,
), scales="alpha/rank", base_tensors=True, modelfile=True, serve_hint="ollama create NAME -f {output}/Modelfile")

RUNTIMES = MappingProxyType({r.name: r for r in (VLLM, SGLANG, LLAMA_CPP, OLLAMA)})


def get_runtime(name: str) -> Runtime:
    """The table for ``name`` (``vllm``, ``sglang``, ``llama.cpp`` or ``ollama``; ``llama-cpp``/``llamacpp`` too)."""
    key = name.lower().replace("llama-cpp", "llama.cpp").replace("llamacpp", "llama.cpp")
    if key not in RUNTIMES:
        raise InvalidOptionError(f"`runtime` must be one of {', '.join(RUNTIMES)}, got {name!r}")
    return RUNTIMES[key]
