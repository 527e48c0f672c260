#!/usr/bin/env bash
# End-to-end GPU check of HiggsLoraTrainer under DeepSpeed ZeRO-3 (both gather settings) and FSDP (full and
# sharded state dicts), through the real Trainer/accelerate engine setup, on CUDA GPUs (1 or more); a few minutes.
# Made for a GPU machine without a network: it uses that machine's own Python and its preinstalled torch,
# transformers, peft and accelerate, puts this repository on PYTHONPATH (nothing is installed into that Python),
# and installs DeepSpeed from carried wheels into a temporary directory when it is missing. Step by step:
# docs/distributed.md ("The GPU check"). Record the result there once it has run.
#
# Usage:
#   scripts/gpu_check.sh                  run the check
#   scripts/gpu_check.sh --dry-run        the set-up only, on any machine (no CUDA needed): the Python, the imports
#                                         and their versions, DeepSpeed (from the wheels if need be), and the
#                                         commands a run would start
#   scripts/gpu_check.sh --prepare-wheels on a machine that reaches the package registry: put DeepSpeed and what it
#                                         needs beyond a stock PyTorch image into .whl/ (carry that folder along)
# Environment:
#   PYTHON        the interpreter (default: python3 on PATH, the machine's own)
#   STACK         higgs|newest: use the project's pinned environment instead (scripts/env.sh; needs the registry)
#   WHEELS        the wheels folder (default: .whl in the repository)
#   NPROC         processes (default: the number of CUDA GPUs)
#   MODES         a subset of: zero3-gather zero3-nogather fsdp-full fsdp-sharded (default: all four)
#   MODE_TIMEOUT  seconds each mode may take (default: 300)
#   GPU_PYTHON    --prepare-wheels: the GPU machine's Python version, for the one compiled wheel (default: 3.12)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
all_modes="zero3-gather zero3-nogather fsdp-full fsdp-sharded"
action=run
case "${1:-}" in
    "") ;;
    --dry-run) action=dry-run ;;
    --prepare-wheels) action=prepare-wheels ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "scripts/gpu_check.sh: unknown argument '$1' (use --dry-run, --prepare-wheels or --help)" >&2; exit 2 ;;
esac
wheels=${WHEELS:-$root/.whl}
if [ -n "${STACK:-}" ]; then
    python="$(scripts/env.sh "$STACK")/bin/python"
else
    python=${PYTHON:-python3}
fi
command -v "$python" >/dev/null || { echo "scripts/gpu_check.sh: no Python at '$python' (set PYTHON)" >&2; exit 2; }

if [ "$action" = prepare-wheels ]; then
    # DeepSpeed is on PyPI as a source archive only: build its (pure-Python) wheel here, without its CUDA ops
    # (DS_BUILD_OPS=0; the check uses torch's AdamW). pydantic_core is the only compiled one: fetched for the GPU
    # machine's Python. The versions are the pinned stack's (requirements/higgs.txt).
    pin() { grep -i -m1 "^$1==" "$root/requirements/higgs.txt" || { echo "no pin for $1" >&2; exit 1; }; }
    mkdir -p "$wheels"
    DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$wheels" "$(pin deepspeed)"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    "$python" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
        --python-version "${GPU_PYTHON:-3.12}" "${platforms[@]}" -d "$wheels" \
        "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
        "$(pin typing_extensions)" "$(pin hjson)"
    ls -1 "$wheels"
    echo "wheels ready in $wheels: carry that folder to the GPU machine and run scripts/gpu_check.sh there"
    exit 0
fi

modes=${MODES:-$all_modes}
for mode in $modes; do
    case " $all_modes " in *" $mode "*) ;; *)
        echo "scripts/gpu_check.sh: unknown mode '$mode' in MODES (choose from: $all_modes)" >&2; exit 2 ;;
    esac
done
needs_deepspeed=0
case " $modes " in *" zero3-"*) needs_deepspeed=1 ;; esac

# Nothing may reach the network; the repository, not an installed copy, is what is checked.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_BUILD_OPS=0 PYTHONUNBUFFERED=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [ $needs_deepspeed = 1 ] && ! "$python" -c "import deepspeed" >/dev/null 2>&1; then
    shopt -s nullglob
    carried=("$wheels"/*.whl)
    shopt -u nullglob
    if [ ${#carried[@]} -eq 0 ]; then
        echo "scripts/gpu_check.sh: DeepSpeed is not importable by $python and there are no wheels in $wheels." \
            "Run 'scripts/gpu_check.sh --prepare-wheels' where the package registry is reachable and carry .whl/" \
            "here, or set MODES to the FSDP modes only." >&2
        exit 1
    fi
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    echo "== DeepSpeed from ${#carried[@]} carried wheels in $wheels, into $site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${carried[@]}"
    export PYTHONPATH="$site:$PYTHONPATH"
fi

echo "== set-up"
NEEDS_DEEPSPEED=$needs_deepspeed ROOT="$root" DRY_RUN=$([ "$action" = dry-run ] && echo 1 || echo 0) "$python" - <<'EOF'
import importlib
import os
import sys
from pathlib import Path

print(f"python: {sys.executable} ({sys.version.split()[0]})")
names = ["torch", "transformers", "peft", "accelerate", "safetensors"] + (["deepspeed"] * (os.environ["NEEDS_DEEPSPEED"] == "1"))
missing = []
for name in names:
    try:
        module = importlib.import_module(name)
        print(f"{name}: {module.__version__} ({Path(module.__file__).parent})")
    except Exception as exc:  # report every missing package, then fail
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    raise SystemExit(f"scripts/gpu_check.sh: cannot import {', '.join(missing)}")
import higgs_trainer  # noqa: E402
import torch  # noqa: E402

root = Path(os.environ["ROOT"]).resolve()
location = Path(higgs_trainer.__file__).resolve()
if not location.is_relative_to(root):
    raise SystemExit(f"scripts/gpu_check.sh: higgs_trainer comes from {location}, not from this repository {root}")
print(f"higgs_trainer: {higgs_trainer.__version__} ({location.parent})")
importlib.import_module("tests.testing_models")  # what the training script builds its tiny model from
gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"CUDA GPUs: {gpus}" + (f" ({torch.cuda.get_device_name(0)})" if gpus else ""))
if not gpus and os.environ["DRY_RUN"] != "1":
    raise SystemExit("scripts/gpu_check.sh: no CUDA GPU visible to torch; this check needs one (try --dry-run)")
EOF

nproc=${NPROC:-$("$python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
out=$(mktemp -d)
mode_command() {
    echo timeout "${MODE_TIMEOUT:-300}" "$python" -m torch.distributed.run --nproc_per_node="$nproc" \
        tests/distributed/gpu_train.py "$out/$1" "$1"
}
echo "== planned ($nproc processes each; output in $out)"
for mode in $modes; do echo "  $(mode_command "$mode")"; done
if [ "$action" = dry-run ]; then
    "$python" -m py_compile tests/distributed/gpu_train.py
    rmdir "$out"
    echo "DRY RUN OK: the set-up works; the commands above need CUDA GPUs"
    exit 0
fi
for mode in $modes; do
    echo "== $mode"
    start=$SECONDS
    timeout "${MODE_TIMEOUT:-300}" "$python" -m torch.distributed.run --nproc_per_node="$nproc" \
        tests/distributed/gpu_train.py "$out/$mode" "$mode"
    echo "   $mode: $((SECONDS - start)) s"
done
echo "GPU CHECK PASSED ($nproc processes; modes: $modes)"
