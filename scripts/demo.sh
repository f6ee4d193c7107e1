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
step "Merge the LoRA into the base (streaming), with a record for exact un-merge, and verify it" \
  loratools merge fixtures/tiny-llama fixtures/adapters/lora -o "$OUT/merged" --record "$OUT/merged.record.safetensors" --verify
step "Un-merge without the record: the error rounding left behind" \
  loratools unmerge "$OUT/merged" fixtures/adapters/lora -o "$OUT/unmerged"
step "Un-merge with the record: the base comes back bit for bit" \
  loratools unmerge "$OUT/merged" fixtures/adapters/lora -o "$OUT/unmerged-exact" --record "$OUT/merged.record.safetensors"
step "Merge into bfloat16 and un-merge: what bfloat16 rounding costs without a record" \
  bash -c "loratools -q merge fixtures/tiny-llama fixtures/adapters/lora -o $OUT/merged-bf16 --dtype bfloat16 && loratools unmerge $OUT/merged-bf16 fixtures/adapters/lora -o $OUT/unmerged-bf16"
step "Check a merged model against base + adapter" loratools verify fixtures/tiny-llama fixtures/adapters/lora "$OUT/merged"
printf '\nDemo finished; outputs are in %s/\n' "$OUT"
