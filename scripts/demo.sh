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
step "Convert the rsLoRA adapter (rank/alpha patterns) to kohya's format, ΔW checked" loratools convert fixtures/adapters/rslora -o "$OUT/rslora-kohya.safetensors" --to kohya
step "Inspect the kohya file" loratools inspect "$OUT/rslora-kohya.safetensors"
if python -c "import gguf" 2>/dev/null; then
  step "Convert the pruned AdaLoRA adapter to a llama.cpp GGUF adapter" loratools convert fixtures/adapters/adalora -o "$OUT/adalora.gguf" --to gguf --base fixtures/tiny-llama
  step "Inspect the GGUF adapter" loratools inspect "$OUT/adalora.gguf"
  step "And back to PEFT" loratools convert "$OUT/adalora.gguf" -o "$OUT/adalora-from-gguf" --to peft --base fixtures/tiny-llama
else
  printf '\n(GGUF steps skipped: the gguf package is absent; pip install "loratools[gguf]")\n'
fi
printf '\nDemo finished; outputs are in %s/\n' "$OUT"
