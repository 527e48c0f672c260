"""Every directory the library writes, under faults: modes a shared box can read, a full disk, a re-save killed
between its two renames, and a target that is a link or a file. Real peft, Trainer, HiggsAudioModel (Higgs stack)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from higgs_trainer import (
    AdapterSaveError,
    HiggsLoraTrainer,
    HiggsTrainerError,
    MergeError,
    extract_adapter,
    find_lora_model,
    merge_adapter,
    verify_adapter,
)
from higgs_trainer.files.atomic import staged_directory
from higgs_trainer.training.resuming import is_adapter_only_checkpoint, load_lora_adapters
from higgs_trainer.training.saving import clone_shared_tensors, write_lora_adapters
from tests.testing_cli import assert_one_line_error, run_cli
from tests.testing_filesystems import mode_of, small_tmpfs, umask
from tests.testing_models import RandomTokens, make_model, tiny_base_model, trained_like, training_args

ALPHA = 8  # tests.testing_models.lora_config: lora_alpha = 2 * r


@pytest.fixture
def component():
    return find_lora_model(trained_like(make_model()))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    tiny_base_model().save_pretrained(str(directory))
    return directory


def full_checkpoint(directory: Path) -> Path:
    """A checkpoint as plain Trainer writes a wrapper: the whole state dict, no adapter."""
    directory.mkdir(parents=True)
    state = clone_shared_tensors(trained_like(make_model()).state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


def residue(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# 2. modes: what a plain mkdir would give (the umask applies), not tempfile.mkdtemp's 0700


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_adapter_directories_get_the_mode_mkdir_gives(component, tmp_path, mask):
    with umask(mask):
        write_lora_adapters(component, tmp_path / "out")
        with staged_directory(tmp_path / "merged") as staging:
            (staging / "f").write_text("x")
    for directory in (tmp_path / "out" / "lora_adapters", tmp_path / "merged"):
        assert mode_of(directory) == 0o777 & ~mask, oct(mode_of(directory))
    assert mode_of(tmp_path / "out" / "lora_adapters" / "adapter_model.safetensors") == 0o666 & ~mask


# 3. killed between the two renames of a re-save: every reader finds the previous adapter


@pytest.fixture
def moved_aside(component, tmp_path):
    """A run whose checkpoint re-save died between its renames: lora_adapters moved aside, new one still staged."""
    checkpoint = tmp_path / "run" / "checkpoint-2"
    write_lora_adapters(component, checkpoint)
    (checkpoint / "adapter_only_checkpoint.json").write_text('{"adapter_dir": "lora_adapters"}')
    previous = {p.name: p.read_bytes() for p in (checkpoint / "lora_adapters").iterdir()}
    shutil.copytree(checkpoint / "lora_adapters", checkpoint / ".lora_adapters.tmp-12345678")
    os.rename(checkpoint / "lora_adapters", checkpoint / ".lora_adapters.old-87654321")
    return checkpoint, previous


def test_verify_merge_extract_and_resume_find_an_adapter_left_moved_aside(moved_aside, base_dir, tmp_path, capsys):
    checkpoint, _ = moved_aside
    code, out, err = run_cli(capsys, "verify", checkpoint, checkpoint / "lora_adapters", "--base", base_dir)
    assert code == 0 and "2 passed, 0 failed" in out, out + err

    result = merge_adapter(base_dir, checkpoint / "lora_adapters", tmp_path / "merged")
    assert result.merged_modules > 0

    save_file({"x": torch.zeros(1)}, str(checkpoint / "model.safetensors"))  # extract: alpha from the adapter's config
    with pytest.raises(Exception, match="no LoRA tensors") as info:
        extract_adapter(checkpoint, tmp_path / "rescued")
    assert "lora_alpha" not in str(info.value)  # found it (the error is about the dummy weights, not alpha)

    assert is_adapter_only_checkpoint(checkpoint)
    fresh = find_lora_model(make_model())
    load_lora_adapters(fresh, checkpoint / "lora_adapters")
    verify_adapter(checkpoint / ".lora_adapters.old-87654321")  # readers read it in place, move nothing
    assert not (checkpoint / "lora_adapters").exists()


def test_the_next_save_moves_the_previous_adapter_back_first(moved_aside, component):
    checkpoint, previous = moved_aside
    write_lora_adapters(component, checkpoint)
    assert (checkpoint / "lora_adapters" / "adapter_model.safetensors").is_file()
    assert residue(checkpoint) == []


# 5. a full disk: the documented error with the one-line cause, nothing left behind


def test_extract_on_a_full_disk(tmp_path, capsys):
    checkpoint = full_checkpoint(tmp_path / "checkpoint-2")
    with small_tmpfs(tmp_path / "full", "4k") as full:
        with pytest.raises(AdapterSaveError, match="No space left on device"):
            extract_adapter(checkpoint, full / "rescued", lora_alpha=ALPHA)
        capsys.readouterr()
        code, _, err = run_cli(capsys, "extract", checkpoint, "-o", full / "rescued", "--lora-alpha", ALPHA)
        assert code == 1
        assert_one_line_error(err, "No space left on device")
        assert list(full.iterdir()) == []


def test_merge_on_a_full_disk(component, base_dir, tmp_path, capsys):
    write_lora_adapters(component, tmp_path)
    with small_tmpfs(tmp_path / "full", "64k") as full:
        with pytest.raises(MergeError, match="No space left on device"):
            merge_adapter(base_dir, tmp_path / "lora_adapters", full / "merged")
        capsys.readouterr()  # the API call's own output (progress bars)
        code, _, err = run_cli(
            capsys, "merge", "--base", base_dir, "--adapter", tmp_path / "lora_adapters", "-o", full / "m"
        )
        assert code == 1
        assert_one_line_error(err, "No space left on device")
        assert list(full.iterdir()) == []


def test_trainer_save_on_a_full_disk_keeps_the_previous_adapter(component, tmp_path):
    with small_tmpfs(tmp_path / "full", "128k") as full:
        write_lora_adapters(component, full)
        before = (full / "lora_adapters" / "adapter_model.safetensors").read_bytes()
        free = os.statvfs(full).f_bavail * os.statvfs(full).f_frsize
        (full / "filler").write_bytes(b"\0" * (free - 4096))  # room for the config, not for the weights
        with pytest.raises(AdapterSaveError, match="No space left on device"):
            write_lora_adapters(component, full)
        assert (full / "lora_adapters" / "adapter_model.safetensors").read_bytes() == before
        assert residue(full) == []
        os.remove(full / "filler")


# 6. output_dir/lora_adapters is a symbolic link or a file: refused before anything is written


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_a_link_or_file_where_the_adapter_goes_is_refused_before_writing(component, tmp_path, kind):
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    target = out / "lora_adapters"
    if kind == "symlink":
        target.symlink_to(elsewhere)
    else:
        target.write_text("not a directory")

    with pytest.raises(HiggsTrainerError, match="not a directory"):  # before training starts
        HiggsLoraTrainer(model=make_model(), args=training_args(out, max_steps=2), train_dataset=RandomTokens())
    with pytest.raises(AdapterSaveError, match="not a directory") as info:
        write_lora_adapters(component, out)
    assert "intact" in str(info.value)
    assert target.is_symlink() == (kind == "symlink") and (elsewhere / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["lora_adapters"]  # no residue, nothing installed


def test_convert_on_a_full_disk_names_the_output(tmp_path, capsys):
    from tests.testing_layout_files import TINY_BOSON_CONFIG, write_model

    write_model(tmp_path / "boson", TINY_BOSON_CONFIG, "boson")
    with small_tmpfs(tmp_path / "full", "16k") as full:
        code, _, err = run_cli(capsys, "convert", tmp_path / "boson", "--to", "transformers", "-o", full / "hf")
        assert code == 1
        assert_one_line_error(err, f"writing {full / 'hf'} failed: [Errno 28] No space left on device")
        assert list(full.iterdir()) == []


# Concurrent writers: two real processes write the same target; the second must not delete the first's staging.

WRITER = """
import pathlib, sys, time
from higgs_trainer.files.atomic import staged_directory

target, name, ready, go = map(pathlib.Path, sys.argv[1:5])
try:
    with staged_directory(target) as staging:
        (staging / "writer").write_text(name.name)
        ready.touch()
        while not go.exists():
            time.sleep(0.01)
except OSError as exc:
    print(exc)
    sys.exit(3)
"""


def start_writer(tmp_path, name):
    flags = [tmp_path / f"{name}.ready", tmp_path / f"{name}.go"]
    argv = [sys.executable, "-c", WRITER, tmp_path / "out" / "merged", name, *flags]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env), flags


def wait_for(path, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.02)


def test_a_second_writer_of_the_same_output_fails_clearly_and_the_first_completes(tmp_path):
    first, (first_ready, first_go) = start_writer(tmp_path, "first")
    wait_for(first_ready, first)  # the first writer is mid-write: its staging directory exists
    second, (_, second_go) = start_writer(tmp_path, "second")
    second_go.touch()
    output = second.communicate(timeout=120)[0]
    assert second.returncode == 3, output
    assert f"another process (pid {first.pid}) is writing {tmp_path / 'out' / 'merged'}" in output, output
    first_go.touch()
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, output  # never "No such file or directory": its staging was left alone
    assert (tmp_path / "out" / "merged" / "writer").read_text() == "first"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merged"]  # no staging, no lock left


def test_a_writer_killed_mid_write_leaves_no_lock(tmp_path):
    first, (first_ready, _) = start_writer(tmp_path, "first")
    wait_for(first_ready, first)
    first.kill()  # the kernel drops its lock; the next writer cleans the staging residue up
    first.communicate(timeout=60)
    with staged_directory(tmp_path / "out" / "merged") as staging:
        (staging / "writer").write_text("next")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merged"]
