"""docs/migration/*.diff: well-formed unified diffs that `git apply` takes against the named speech_synth commit.

Each patch is parsed as git does: file headers, and hunks whose line counts match their `@@ -a,b +c,d @@`
headers, in order, with no `...` placeholder line; and the changes the docs promise are in the patches (a
`--resume_from_checkpoint` option passed to `trainer.train`, no extra `on_step_end` call in `train_v2_ddp.py`).
The community scripts are not part of this repository (they carry no license): with
`HIGGS_TRAINER_SPEECH_SYNTH` set to a clone of codeman911/speech_synth (a checkout or a bare repository holding
the commit), the patches are also applied to the scripts of that commit with `git apply` and the patched scripts
are read back.
"""

import ast
import os
import re
import subprocess
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


RESUMABLE = ["trainer.diff", "trainer_ddp.diff", "train_v2_ddp.diff"]  # trainer.train() had no resume option


def changed_lines(patch_name):
    """(added, removed) code lines of a patch, without their +/- marks."""
    ((hunks,),) = [parse((DOCS / "migration" / patch_name).read_text()).values()]
    body = [line for *_, lines in hunks for line in lines]
    return [line[1:] for line in body if line[:1] == "+"], [line[1:] for line in body if line[:1] == "-"]


@pytest.mark.parametrize("patch_name", RESUMABLE)
def test_the_patch_adds_a_resume_option_that_reaches_trainer_train(patch_name):
    added, _ = changed_lines(patch_name)
    assert any('add_argument("--resume_from_checkpoint"' in line for line in added), added
    assert any("trainer.train(resume_from_checkpoint=" in line for line in added), added


def test_the_train_v2_ddp_patch_removes_the_extra_on_step_end_call():
    added, removed = changed_lines("train_v2_ddp.diff")
    assert any('call_event("on_step_end"' in line for line in removed)
    assert not any("call_event(" in line for line in added), added


def speech_synth() -> Path:
    """The speech_synth clone named by HIGGS_TRAINER_SPEECH_SYNTH (skip when it is not set)."""
    source = os.environ.get("HIGGS_TRAINER_SPEECH_SYNTH")
    if not source:
        pytest.skip("HIGGS_TRAINER_SPEECH_SYNTH is not set (a clone of codeman911/speech_synth)")
    return Path(source)


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def patched_scripts(tmp_path_factory):
    """The three scripts of COMMIT, patched with `git apply` in a fresh repository: {patch name: source text}."""
    clone, work = speech_synth(), tmp_path_factory.mktemp("speech_synth")
    git("init", "-q", ".", cwd=work)
    for path in SCRIPTS.values():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(git("show", f"{COMMIT}:{path}", cwd=clone))
    for patch in PATCHES:
        git("apply", "--check", str(patch), cwd=work)  # raises with git's message if a hunk does not apply
        git("apply", str(patch), cwd=work)
    return {name: (work / path).read_text() for name, path in SCRIPTS.items()}


def calls(source, name):
    """The calls of ``name`` (an attribute or function name) in a script."""
    return [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == name
    ]


@pytest.mark.parametrize("patch_name", RESUMABLE)
def test_the_patched_script_has_the_resume_option_and_passes_it_to_train(patched_scripts, patch_name):
    source = patched_scripts[patch_name]
    options = [
        c for c in calls(source, "add_argument") if c.args and ast.literal_eval(c.args[0]) == "--resume_from_checkpoint"
    ]
    assert len(options) == 1
    (train,) = [c for c in calls(source, "train") if ast.unparse(c.func) == "trainer.train"]
    assert [k.arg for k in train.keywords] == ["resume_from_checkpoint"]


def test_the_patched_train_v2_ddp_fires_no_on_step_end_event_of_its_own(patched_scripts):
    original = git("show", f"{COMMIT}:{SCRIPTS['train_v2_ddp.diff']}", cwd=speech_synth())
    assert len(calls(original, "call_event")) == 1  # the extra call the patch removes
    assert calls(patched_scripts["train_v2_ddp.diff"], "call_event") == []
    assert all(ast.parse(text) for text in patched_scripts.values())  # every patched script is valid Python
