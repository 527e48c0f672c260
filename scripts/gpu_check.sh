#!/usr/bin/env bash
# End-to-end GPU check of HiggsLoraTrainer under DeepSpeed ZeRO-3 (both gather settings) and FSDP
# (full and sharded state dicts), through the real Trainer/accelerate engine setup. Needs CUDA GPUs
# (1 or more; NPROC defaults to the number of GPUs). Record the result in docs/distributed.md once it has run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=$(scripts/env.sh "${STACK:-higgs}")
nproc=${NPROC:-$("$venv/bin/python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
out=$(mktemp -d)
for mode in zero3-gather zero3-nogather fsdp-full fsdp-sharded; do
    PYTHONPATH="$root" "$venv/bin/python" -m torch.distributed.run --nproc_per_node="$nproc" \
        tests/distributed/gpu_train.py "$out/$mode" "$mode"
done
echo "GPU CHECK PASSED ($nproc processes)"
