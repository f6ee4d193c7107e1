"""Serving runtimes: what each one loads, checked before you deploy, and exports that load there.

- :mod:`.runtimes`: the runtimes as data (vLLM, SGLang, llama.cpp, Ollama): their rules, each with its source
  and the versions it holds for, and the per-runtime behaviour as fields, never as name branches;
- :mod:`.check`: :func:`~loratools.serve.check.check_file` (``loratools check``) and ``check_adapter``: what a
  runtime would refuse, drop or change;
- :mod:`.export`: :func:`~loratools.serve.export.export_adapter` (``loratools export``): the adapter rewritten
  so that it loads there with the same ΔW (DoRA folded into plain LoRA with the base's weights);
- :mod:`.vllm_worker`: a standalone script (vLLM and the standard library only) run in vLLM's own environment
  (``make vllm``): log-probs from the real engine, base alone or with adapters, JSON in and out.
"""
