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
step "Train a LoRA adapter on the fixture model for a few seconds" loratools train fixtures/tiny-llama fixtures/corpus.txt -o "$OUT/trained-lora" --steps 20 --rank 4 --lr 2e-3 --seq-len 32 --eval-split 0.02
step "Inspect the trained adapter" loratools inspect "$OUT/trained-lora"
step "Train AdaLoRA (12 → 4 triplets per layer on average), saved with its final rank_pattern" loratools train fixtures/tiny-llama fixtures/corpus.txt -o "$OUT/trained-adalora" --method adalora --init-rank 12 --target-rank 4 --alpha 12 --steps 20 --lr 1e-2 --seq-len 32 --eval-split 0.02
step "Inspect the AdaLoRA result (ranks differ per layer)" loratools inspect "$OUT/trained-adalora"
printf '\nDemo finished; outputs are in %s/\n' "$OUT"
