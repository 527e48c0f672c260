"""docs/migration/*.diff: well-formed unified diffs that `git apply` takes against the named speech_synth commit.

The community scripts themselves are not part of this repository, so applying the patches is checked by hand
(`git apply --check`, docs/migration.md); here each patch is parsed as git does: file headers, and hunks whose line
counts match their `@@ -a,b +c,d @@` headers, in order, with no `...` placeholder line.
"""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PATCHES = sorted((DOCS / "migration").glob("*.diff"))
COMMIT = "6f5d720dc97cfce9fd2641dd5875835a40259913"
SCRIPTS = {
    "trainer.diff": "train-higgs-audio/trainer/trainer.py",
    "trainer_ddp.diff": "train-higgs-audio/trainer_ddp.py",
    "train_v2_ddp.diff": "train-higgs-audio/trainer/train_v2_ddp.py",
}
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse(text):
    """{path: [(old_start, old_count, new_start, new_count, body lines)]}; raises AssertionError where git would fail."""
    lines = text.split("\n")
    assert lines[-1] == "", "a patch ends with a newline"
    lines = lines[:-1]
    start = next(i for i, line in enumerate(lines) if line.startswith("diff --git "))
    assert all(line.startswith("#") for line in lines[:start]), "only # comment lines before the first diff"
    files, i = {}, start
    while i < len(lines):
        match = re.fullmatch(r"diff --git a/(\S+) b/(\S+)", lines[i])
        assert match and match[1] == match[2], f"line {i + 1}: expected a 'diff --git a/X b/X' header: {lines[i]!r}"
        path = match[1]
        i += 1
        if lines[i].startswith("index "):
            i += 1
        assert lines[i] == f"--- a/{path}" and lines[i + 1] == f"+++ b/{path}", f"line {i + 1}: ---/+++ headers"
        i += 2
        hunks = files.setdefault(path, [])
        while i < len(lines) and not lines[i].startswith("diff --git "):
            header = HUNK.match(lines[i])
            assert header, f"line {i + 1}: expected a hunk header: {lines[i]!r}"
            old_start, old_count, new_start, new_count = (int(g) if g else 1 for g in header.groups())
            i += 1
            body, old, new = [], 0, 0
            while (old < old_count or new < new_count) and i < len(lines):
                line = lines[i]
                assert line[:1] in (" ", "-", "+", "\\"), f"line {i + 1}: not a hunk line: {line!r}"
                if line[:1] in " -":
                    old += 1
                if line[:1] in " +":
                    new += 1
                body.append(line)
                i += 1
            while i < len(lines) and lines[i].startswith("\\ No newline at end of file"):
                i += 1
            assert (old, new) == (old_count, new_count), (
                f"hunk at line {old_start}: {old}/{new} lines, header says {old_count}/{new_count}"
            )
            hunks.append((old_start, old_count, new_start, new_count, body))
    return files


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_is_a_well_formed_unified_diff_of_its_script(patch):
    text = patch.read_text()
    assert COMMIT in text.split("diff --git", 1)[0], f"{patch.name} does not name the commit it applies to"
    files = parse(text)
    assert list(files) == [SCRIPTS[patch.name]]
    (hunks,) = files.values()
    assert hunks
    offset = 0
    for index, (old_start, old_count, new_start, new_count, body) in enumerate(hunks):
        assert new_start == old_start + offset, f"hunk {index + 1}: +{new_start} does not follow from -{old_start}"
        offset += new_count - old_count
        if index:
            previous = hunks[index - 1]
            assert old_start >= previous[0] + previous[1], f"hunk {index + 1} overlaps the one before"
        assert not [line for line in body if line[1:].strip() in ("...", "…")], "a placeholder line instead of code"
        assert any(line.startswith(("+", "-")) for line in body), f"hunk {index + 1} changes nothing"


def test_every_script_has_its_patch_and_the_guide_names_the_commit():
    assert sorted(p.name for p in PATCHES) == sorted(SCRIPTS)
    guide = (DOCS / "migration.md").read_text()
    assert COMMIT in guide
    for name in SCRIPTS:
        assert f"migration/{name}" in guide
