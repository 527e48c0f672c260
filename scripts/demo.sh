#!/usr/bin/env bash
# The main job: a tiny real Higgs Audio LoRA training on CPU that writes verified lora_adapters
# into every checkpoint and the final output, then prints where they are and what they hold.
#   scripts/demo.sh [ARGS]                 boson_multimodal's HiggsAudioModel (the Higgs stack), examples/train_higgs_lora.py
#   scripts/demo.sh --stack newest [ARGS]  transformers 5.x's HiggsAudioV2ForConditionalGeneration: train, then speak
#                                          with base + adapter (no merge) into a WAV, examples/speak_with_adapter.py
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stack=higgs
case "${1:-}" in
    --stack) stack=${2:?usage: scripts/demo.sh [--stack higgs|newest] [ARGS]}; shift 2 ;;
    --stack=*) stack=${1#--stack=}; shift ;;
esac
case "$stack" in
    higgs) exec "$(scripts/env.sh higgs)/bin/python" examples/train_higgs_lora.py "$@" ;;
    newest) exec "$(scripts/env.sh newest)/bin/python" examples/speak_with_adapter.py "$@" ;;
    *) echo "scripts/demo.sh: unknown stack '$stack' (higgs or newest)" >&2; exit 2 ;;
esac
