"""`higgs-trainer extract`: rescue the adapter from checkpoints written the old, broken way (plain Trainer on a wrapper)."""

import dataclasses
import errno
import json
import os
import pathlib
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

from higgs_trainer.extract import extraction
from higgs_trainer.training.saving import clone_shared_tensors
from tests.testing_cli import assert_one_line_error, run_cli
from tests.testing_models import (
    HIGGS_STACK,
    RandomTokens,
    assert_same_tensors,
    logits_of,
    make_model,
    probe_batch,
    tiny_base_model,
    training_args,
)
from tests.testing_payloads import MaliciousPickle

ALPHA = "8"  # tests.testing_models.lora_config: lora_alpha = 2 * r = 8


# The old scripts' plain Trainer (the tiny Higgs models of both stacks have no tied tensors, which it could not save).
PlainTrainer = Trainer


@dataclasses.dataclass
class ScriptArguments(TrainingArguments):
    """Training arguments of a script that keeps its LoRA settings in them (saved as training_args.bin)."""

    lora_alpha: float = 8.0


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory):
    """{layout: (checkpoint dir, logits of the trained wrapper)}, trained with plain Trainer: no adapter saved."""
    runs = {}
    for layout in ("model", "text_model"):
        out = tmp_path_factory.mktemp(f"old-{layout}")
        model = make_model(layout)
        PlainTrainer(model=model, args=training_args(out, max_steps=2), train_dataset=RandomTokens()).train()
        runs[layout] = (out / "checkpoint-2", logits_of(model, probe_batch()))
    return runs


@pytest.fixture
def checkpoint(old_runs, tmp_path):
    """A private copy of the `model`-layout checkpoint, to damage."""
    return pathlib.Path(shutil.copytree(old_runs["model"][0], tmp_path / "checkpoint-2"))


def adapter_tensors(directory):
    return load_file(str(pathlib.Path(directory) / "adapter_model.safetensors"))


@pytest.mark.parametrize("layout,prefix", [("model", "model."), ("text_model", "model.text_model.")])
def test_extract_reproduces_the_trained_wrappers_logits(old_runs, tmp_path, capsys, layout, prefix):
    checkpoint, trained = old_runs[layout]
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "lora_adapters").exists()
    code, out, err = run_cli(capsys, "extract", checkpoint, "--output", tmp_path / "rescued", "--lora-alpha", ALPHA)
    assert code == 0, err
    assert f"prefix {prefix!r}" in out and "r=4, lora_alpha=8" in out and "targets q_proj, v_proj" in out

    base = tiny_base_model()
    assert not torch.allclose(logits_of(base, probe_batch()), trained, atol=1e-4), "training changed nothing"
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "rescued"))
    file_keys = set(adapter_tensors(tmp_path / "rescued"))
    assert file_keys == set(get_peft_model_state_dict(loaded, save_embedding_layers=False))  # nothing missing
    torch.testing.assert_close(logits_of(loaded, probe_batch()), trained, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob(".rescued*")), "staging residue"


def test_sharded_safetensors_with_index_gives_the_same_adapter(checkpoint, tmp_path, capsys):
    state = load_file(str(checkpoint / "model.safetensors"))
    keys = sorted(state)
    weight_map = {}
    for i, chunk in enumerate((keys[::3], keys[1::3], keys[2::3])):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: state[k] for k in chunk}, str(checkpoint / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (checkpoint / "model.safetensors").unlink()

    assert run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "sharded", "--lora-alpha", ALPHA)[0] == 0
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    expected = {k.replace("model.", "", 1).replace(".default", ""): v for k, v in lora.items()}
    assert_same_tensors(adapter_tensors(tmp_path / "sharded"), expected)


def test_pytorch_model_bin_gives_the_same_adapter(checkpoint, old_runs, tmp_path, capsys):
    torch.save(load_file(str(checkpoint / "model.safetensors")), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    assert run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "from-bin", "--lora-alpha", ALPHA)[0] == 0
    assert run_cli(capsys, "extract", old_runs["model"][0], "-o", tmp_path / "ref", "--lora-alpha", ALPHA)[0] == 0
    assert_same_tensors(adapter_tensors(tmp_path / "from-bin"), adapter_tensors(tmp_path / "ref"))


def test_a_malicious_pickle_is_refused_and_runs_nothing(checkpoint, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save(
        {"model.base_model.model.x.lora_A.default.weight": MaliciousPickle(marker)}, checkpoint / "pytorch_model.bin"
    )
    (checkpoint / "model.safetensors").unlink()
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out", "--lora-alpha", ALPHA)
    assert code == 1
    assert_one_line_error(err, "weights_only=True refused it")
    assert not marker.exists() and not (tmp_path / "out").exists()


# lora_alpha: given, found in the run's files, or refused


def test_lora_alpha_unknown_is_refused(checkpoint, tmp_path, capsys):
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, "lora_alpha cannot be inferred from the weights")
    assert "--lora-alpha" in err and not (tmp_path / "out").exists()


def test_lora_alpha_from_the_runs_training_args(checkpoint, tmp_path, capsys):
    # A script whose TrainingArguments subclass holds lora_alpha; Trainer saves it as training_args.bin.
    torch.save(
        ScriptArguments(output_dir=str(tmp_path), lora_alpha=8.0, report_to=[]), checkpoint / "training_args.bin"
    )
    code, out, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["lora_alpha"] == 8.0 and result["alpha_source"].endswith("training_args.bin")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_alpha"] == 8.0


def test_training_args_are_read_without_running_their_pickle(checkpoint, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"lora_alpha": 8.0, "x": MaliciousPickle(marker)}, checkpoint / "training_args.bin")
    assert run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out")[0] == 0
    assert not marker.exists()


def test_lora_alpha_from_an_adapter_config_file(checkpoint, old_runs, tmp_path, capsys):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1}
    (tmp_path / "run_config.json").write_text(json.dumps(config))
    code, out, err = run_cli(
        capsys, "extract", checkpoint, "-o", tmp_path / "out", "--adapter-config", tmp_path / "run_config.json"
    )
    assert code == 0, err
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["lora_alpha"] == 8 and written["lora_dropout"] == 0.1 and written["inference_mode"] is True

    code, _, err = run_cli(
        capsys,
        "extract",
        checkpoint,
        "-o",
        tmp_path / "o2",
        "--adapter-config",
        tmp_path / "run_config.json",
        "--lora-alpha",
        "16",
    )
    assert code == 2
    assert_one_line_error(err, "disagrees with lora_alpha 8.0")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"peft_type": "PREFIX_TUNING"}, "not 'LORA'"),
        ({"r": 8}, "another rank than their tensors have"),
        ({"rank_pattern": {"q_proj": 2}}, "another rank than their tensors have"),
        ({"target_modules": ["q_proj"]}, "does not match the checkpoint's LoRA modules"),
        # what the config promises beyond lora_A/lora_B would load wrong from the copied tensors
        ({"use_dora": True}, "uses use_dora"),
        ({"bias": "all"}, "uses bias='all'"),
        ({"modules_to_save": ["lm_head"]}, "lists modules_to_save"),
        ({"lora_bias": True}, "says lora_bias=True but the checkpoint has no lora_B bias tensors"),
    ],
)
def test_an_adapter_config_that_does_not_fit_is_refused(checkpoint, tmp_path, capsys, change, message):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **change}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out", "--adapter-config", tmp_path)
    assert code == 1
    assert_one_line_error(err, message)
    assert not (tmp_path / "out").exists()


# bad input


def test_missing_path_is_a_usage_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "extract", tmp_path / "nope", "-o", tmp_path / "out", "--lora-alpha", ALPHA)
    assert code == 2
    assert_one_line_error(err, "does not exist")


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("hello")
    code, _, err = run_cli(capsys, "extract", tmp_path / "notes", "-o", tmp_path / "out", "--lora-alpha", ALPHA)
    assert code == 1
    assert_one_line_error(err, "is not a checkpoint")


def test_a_run_directory_names_its_checkpoints(old_runs, tmp_path, capsys):
    run = old_runs["model"][0].parent
    code, _, err = run_cli(capsys, "extract", run, "-o", tmp_path / "out", "--lora-alpha", ALPHA)
    assert code == 1
    assert_one_line_error(err, "pass one of its checkpoints: 'checkpoint-2'")


def test_truncated_safetensors(checkpoint, tmp_path, capsys):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out", "--lora-alpha", ALPHA)
    assert code == 1
    assert_one_line_error(err, "truncated or corrupt")


def test_missing_lora_B_is_refused(checkpoint, tmp_path, capsys):
    state = load_file(str(checkpoint / "model.safetensors"))
    dropped = "model.base_model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    if not HIGGS_STACK:
        dropped = dropped.replace("model.layers", "model.model.layers")
    del state[dropped]
    save_file(state, str(checkpoint / "model.safetensors"))
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out", "--lora-alpha", ALPHA)
    assert code == 1
    assert_one_line_error(err, "missing from the checkpoint")
    assert "q_proj.lora_B" in err


def test_a_checkpoint_without_lora_tensors(checkpoint, tmp_path, capsys):
    save_file(clone_shared_tensors(tiny_base_model().state_dict()), str(checkpoint / "model.safetensors"))
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out", "--lora-alpha", ALPHA)
    assert code == 1
    assert_one_line_error(err, "no LoRA tensors")


def test_output_that_is_not_empty_needs_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", out, "--lora-alpha", ALPHA)
    assert code == 2
    assert_one_line_error(err, "exists and is not empty")
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli(capsys, "extract", checkpoint, "-o", out, "--lora-alpha", ALPHA, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_disk_full_leaves_nothing_half_written(checkpoint, tmp_path, capsys, monkeypatch):
    def save_file_on_a_full_disk(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"\0" * 100)  # part of the file made it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(extraction, "save_file", save_file_on_a_full_disk)
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out", "--lora-alpha", ALPHA)
    assert code == 1
    assert_one_line_error(err, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # no output, no staging residue


def test_debug_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        capsys, "extract", tmp_path / "empty", "-o", tmp_path / "out", "--lora-alpha", ALPHA, "--debug"
    )
    assert code == 1
    assert "Traceback" in err and "is not a checkpoint" in err.strip().splitlines()[-1]


def test_several_prefixes_need_prefix(checkpoint, tmp_path, capsys):
    state = load_file(str(checkpoint / "model.safetensors"))
    state.update({"other." + k[len("model.") :]: v.clone() for k, v in state.items() if ".lora_" in k})
    save_file(state, str(checkpoint / "model.safetensors"))
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out", "--lora-alpha", ALPHA)
    assert code == 2
    assert_one_line_error(err, "choose one with --prefix")
    code, out, _ = run_cli(
        capsys, "extract", checkpoint, "-o", tmp_path / "out", "--lora-alpha", ALPHA, "--prefix", "model"
    )
    assert code == 0 and "prefix 'model.'" in out


def test_lora_on_some_layers_only_targets_exactly_those(checkpoint, tmp_path, capsys):
    # LoRA on layer 0 only: the leaf name q_proj also names layer 1's module, which has none.
    state = load_file(str(checkpoint / "model.safetensors"))
    layer1 = {k: v for k, v in state.items() if "layers.1." in k and ("_proj." in k)}
    for key, value in layer1.items():
        del state[key]
        if ".lora_" not in key:
            state[key.replace(".base_layer.", ".")] = value
    save_file(state, str(checkpoint / "model.safetensors"))
    assert run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out", "--lora-alpha", ALPHA)[0] == 0
    targets = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(targets, str) and "layers\\.0\\.self_attn\\.q_proj" in targets
    loaded = PeftModel.from_pretrained(tiny_base_model(), str(tmp_path / "out"))
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in loaded.named_parameters() if ".lora_A." in n}
    assert len(lora_modules) == 2 and all("layers.0." in m for m in lora_modules)
    assert set(adapter_tensors(tmp_path / "out")) == set(get_peft_model_state_dict(loaded, save_embedding_layers=False))


# outputs that would destroy an input, and layouts found in review


@pytest.mark.parametrize("target", ["checkpoint", "run"])
def test_overwrite_never_replaces_the_input(checkpoint, capsys, target):
    output = checkpoint if target == "checkpoint" else checkpoint.parent
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", output, "--lora-alpha", ALPHA, "--overwrite")
    assert code == 2
    assert_one_line_error(err, "would replace the input")
    assert (checkpoint / "model.safetensors").is_file()


def test_symlinked_or_current_directory_output_is_refused(checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "link", "--lora-alpha", ALPHA)
    assert code == 2
    assert_one_line_error(err, "is a symbolic link")
    assert (tmp_path / "link").is_symlink() and not any((tmp_path / "real").iterdir())

    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", ".", "--lora-alpha", ALPHA)
    assert code == 2
    assert_one_line_error(err, "is (or contains) the current directory")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 16)


class Tower(torch.nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.layers = torch.nn.ModuleList(Block() for _ in range(blocks))


class TwoTowers(torch.nn.Module):
    """Module paths that are tails of others: `layers.0.q_proj` and `tower.layers.0.q_proj` (as in HiggsAudioModel
    with its audio tower)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = Tower(1).layers
        self.tower = Tower(2)

    def forward(self, x):
        return sum(block.q_proj(x) for block in [*self.layers, *self.tower.layers])


def test_a_rank_pattern_is_anchored_so_longer_paths_keep_their_rank(tmp_path, capsys):
    # layers.0.q_proj at r=8, the two tower q_proj at r=4: the rescued rank_pattern must not reach the tower.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={r"^layers\.0\.q_proj": 8})
    trained = get_peft_model(TwoTowers(), config)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    save_file(
        {f"model.{k}": v.contiguous() for k, v in trained.state_dict().items()}, str(checkpoint / "model.safetensors")
    )

    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "rescued", "--lora-alpha", ALPHA)
    assert code == 0, err
    assert run_cli(capsys, "verify", tmp_path / "rescued")[0] == 0
    loaded = PeftModel.from_pretrained(TwoTowers(), str(tmp_path / "rescued"))
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), trained(x))


def test_trainable_token_deltas_are_refused(checkpoint, tmp_path, capsys):
    state = load_file(str(checkpoint / "model.safetensors"))
    state["model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"] = torch.ones(2, 64)
    save_file(state, str(checkpoint / "model.safetensors"))
    code, _, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "out", "--lora-alpha", ALPHA)
    assert code == 1
    assert_one_line_error(err, "trainable token deltas")
    assert not (tmp_path / "out").exists()


def test_the_old_adapters_task_type_is_not_carried_over(checkpoint, tmp_path, capsys):
    # The community scripts' CAUSAL_LM made PeftModel.from_pretrained build a PeftModelForCausalLM around the component.
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
    }
    (tmp_path / "run_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(
        capsys, "extract", checkpoint, "-o", tmp_path / "out", "--adapter-config", tmp_path / "run_config.json"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] is None
    loaded = PeftModel.from_pretrained(tiny_base_model(), str(tmp_path / "out"))
    assert type(loaded) is PeftModel
