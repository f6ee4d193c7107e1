#!/usr/bin/env bash
# The demo: loratools end to end on the bundled fixtures. Run it with `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=demo-out
rm -rf "$OUT" && mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "Inspect a PEFT LoRA adapter" loratools inspect fixtures/adapters/lora
step "Inspect a pruned PEFT AdaLoRA adapter (one module kept rank 0)" loratools inspect fixtures/adapters/adalora
step "Inspect loratools' single-file form, as JSON (first lines)" bash -c "loratools inspect fixtures/adapters/lora.safetensors --json | head -n 12"
# Hub: push and pull against a loopback stand-in for the Hub (tests/hub_server.py): no internet needed.
# A subshell, so that HF_* settings do not leak into the steps after it.
(
  python tests/hub_server.py --token hf_demo_token_0123456789 --user demo --url-file "$OUT/hub-url" --lifetime 120 &
  HUB_PID=$!
  trap 'kill $HUB_PID 2>/dev/null || true' EXIT
  for _ in $(seq 100); do [ -s "$OUT/hub-url" ] && break; sleep 0.1; done
  export HF_ENDPOINT="$(cat "$OUT/hub-url")" HF_HOME="$OUT/hf-home" HF_TOKEN=hf_demo_token_0123456789 HF_HUB_DISABLE_XET=1
  step "Push an AdaLoRA adapter (PEFT layout + model card, one commit)" loratools push fixtures/adapters/adalora demo/tiny-adalora --private
  step "Push the single-file LoRA to a branch (converted to PEFT layout first)" loratools push fixtures/adapters/lora.safetensors demo/tiny-lora --revision dev
  step "Pull it back into a folder" loratools -q pull demo/tiny-lora --revision dev -o "$OUT/pulled-lora"
  step "The model card it carries (metadata)" head -n 8 "$OUT/pulled-lora/README.md"
  step "Any ADAPTER argument may be hf://REPO_ID[@REV]" loratools inspect hf://demo/tiny-adalora
  step "Offline mode serves the cache" env HF_HUB_OFFLINE=1 loratools -q pull demo/tiny-adalora
)
printf '\nDemo finished; outputs are in %s/\n' "$OUT"
