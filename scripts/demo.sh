#!/usr/bin/env bash
# The main job: a tiny real Higgs Audio LoRA training on CPU that writes verified lora_adapters
# into every checkpoint and the final output, then prints where they are and what they hold.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
higgs=$(scripts/env.sh higgs)
exec "$higgs/bin/python" examples/train_higgs_lora.py "$@"
