#!/usr/bin/env bash
# Usage: scripts/env.sh higgs|newest  -> prints the path of a ready virtual environment for that stack.
# Creates it on first use (from requirements/<stack>.txt, which pins torch==2.13.0;
# where pip is configured with the local CPU build, that is what it takes),
# reuses it while the requirements are unchanged, and installs this checkout into it (editable).
set -euo pipefail
stack=${1:?usage: scripts/env.sh higgs|newest}
root=$(cd "$(dirname "$0")/.." && pwd)
req="$root/requirements/$stack.txt"
[ -f "$req" ] || { echo "scripts/env.sh: no $req (stacks: higgs, newest)" >&2; exit 2; }
nodeps="$root/requirements/$stack-nodeps.txt"
key=$({ cat "$req" "$root/scripts/env.sh"; if [ -f "$nodeps" ]; then cat "$nodeps"; fi; } | sha256sum | cut -c1-12)
venv="${HIGGS_TRAINER_VENVS:-$HOME/.cache/higgs_trainer/venvs}/$stack-$key"
if [ ! -f "$venv/.complete" ]; then
    echo "scripts/env.sh: creating $venv (first run takes a few minutes)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    # DS_BUILD_OPS=0: DeepSpeed builds its few CPU ops on first use instead of at install time.
    DS_BUILD_OPS=0 "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
    if [ -f "$nodeps" ]; then
        # boson-multimodal and what its data path imports, without their heavy declared dependencies.
        "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -r "$nodeps" >&2
    fi
    # torchaudio without its compiled extension: the registry has no torchaudio build for the pinned torch 2.13 CPU
    # (torchaudio 2.11.0's lib/*.so link CUDA libraries and cannot load). torchaudio's loader treats a missing
    # library file as "no extension" (torchaudio/_extension/utils.py, _load_lib), and transformers' Higgs codec
    # (HiggsAudioV2TokenizerModel, HiggsAudioV2Processor) uses only the pure-Python torchaudio.functional.resample.
    # This step can go once a torchaudio build for the pinned torch exists (then pin it in requirements/ instead).
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps torchaudio==2.11.0 >&2
    rm -f "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/torchaudio/lib/*.so
    touch "$venv/.complete"
fi
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$root" >&2
echo "$venv"
