#!/usr/bin/env bash
# Every check on both stacks: ruff, the strict docs build, then the whole pytest suite on the Higgs stack and on the newest stack
# (tests/ and the docstring examples of higgs_trainer/ as doctests: setup.cfg's [tool:pytest]).
# Sets up the environments it needs (scripts/env.sh). Exits non-zero if anything fails.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
status=0
higgs=$(scripts/env.sh higgs) || exit 1
newest=$(scripts/env.sh newest) || exit 1
# The convert tests run each stack's half of a cross-stack check with that stack's python (tests/test_convert.py).
export HIGGS_TRAINER_HIGGS_PYTHON="$higgs/bin/python" HIGGS_TRAINER_NEWEST_PYTHON="$newest/bin/python"
# The listening page is checked in headless Chromium (Debian's package): installed here when missing, and then the
# browser tests must run (they skip only where no chromium could be had, and never under CI).
if scripts/browser.sh >/dev/null; then export HIGGS_TRAINER_REQUIRE_BROWSER=1; else echo "== no chromium: the browser tests skip"; fi
echo "== ruff"
"$higgs/bin/ruff" check . && "$higgs/bin/ruff" format --check . || status=1
echo "== docs: mkdocs build --strict"
# Not --quiet: with it, strict mode does not count the warnings it hides, and the build passes a broken link.
# Any WARNING or ERROR line fails the check too, whatever mkdocs' own exit status says.
site=$(mktemp -d)
docs_log=$(NO_MKDOCS_2_WARNING=1 "$higgs/bin/mkdocs" build --strict --site-dir "$site" 2>&1) || status=1
if grep -E '^(WARNING|ERROR)' <<<"$docs_log"; then status=1; fi
grep -q 'Documentation built' <<<"$docs_log" || { echo "$docs_log" >&2; status=1; }
rm -rf "$site"
# A test that needs a part of the environment (DeepSpeed, root for a tmpfs, the other stack's python, the installed
# console script) fails here when that part is missing, instead of skipping (tests/testing_environment.py).
export HIGGS_TRAINER_STRICT_SKIPS=1
for venv in "$higgs" "$newest"; do
    echo "== pytest on $(basename "$venv")"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=1
done
if [ $status -eq 0 ]; then echo "ALL CHECKS PASSED"; else echo "SOME CHECKS FAILED" >&2; fi
exit $status
