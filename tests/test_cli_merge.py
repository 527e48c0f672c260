"""`higgs-trainer merge` of a tiny saved base (the real HiggsAudioModel on the Higgs stack) with a trained adapter."""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from higgs_trainer import HiggsLoraTrainer
from higgs_trainer.files import support_files
from tests.testing_cli import assert_one_line_error, rename_lora_modules, run_cli
from tests.testing_models import (
    HIGGS_STACK,
    VOCAB,
    RandomTokens,
    logits_of,
    make_model,
    probe_batch,
    tiny_base_model,
    training_args,
)

WEIGHTS = "adapter_model.safetensors"


def save_base(directory, dtype):
    """A tiny base saved with save_pretrained, with a real (word-level) tokenizer beside it."""
    tiny_base_model().to(dtype).save_pretrained(str(directory))
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w1", pad_token="w0").save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """The adapter of a short HiggsLoraTrainer run (output/checkpoint-2/lora_adapters)."""
    out = tmp_path_factory.mktemp("run")
    HiggsLoraTrainer(model=make_model(), args=training_args(out, max_steps=2), train_dataset=RandomTokens()).train()
    return out / "checkpoint-2" / "lora_adapters"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return {
        dtype: save_base(tmp_path_factory.mktemp(str(dtype)[6:]), dtype) for dtype in (torch.float32, torch.bfloat16)
    }


@pytest.fixture
def adapter(adapter_dir, tmp_path):
    """A private copy of the adapter, to damage."""
    return pathlib.Path(shutil.copytree(adapter_dir, tmp_path / "adapter"))


def saved_dtypes(directory):
    dtypes = set()
    for file in pathlib.Path(directory).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as reader:
            dtypes |= {reader.get_slice(k).get_dtype() for k in reader.keys()}
    return dtypes


def adapter_logits(base_dtype, adapter_dir):
    return logits_of(PeftModel.from_pretrained(tiny_base_model().to(base_dtype), str(adapter_dir)), probe_batch())


@pytest.mark.parametrize("method", ["streaming", "in-memory"])
def test_merged_model_reloads_and_gives_the_adapters_logits(bases, adapter_dir, tmp_path, capsys, method):
    base_cls = type(tiny_base_model())
    option = ["--in-memory"] if method == "in-memory" else []
    code, out, err = run_cli(
        capsys, "merge", "--base", bases[torch.float32], "--adapter", adapter_dir, "-o", tmp_path / "m", *option
    )
    assert code == 0, err
    assert f"({base_cls.__name__}, float32)" in out and "4 LoRA modules" in out and f"({method})" in out

    merged = base_cls.from_pretrained(str(tmp_path / "m"), local_files_only=True)
    expected = adapter_logits(torch.float32, adapter_dir)
    assert not torch.allclose(logits_of(tiny_base_model(), probe_batch()), expected, atol=1e-4)
    torch.testing.assert_close(logits_of(merged, probe_batch()), expected, rtol=1e-4, atol=1e-4)
    assert not any("lora" in name for name, _ in merged.named_parameters())

    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"model.safetensors", "config.json", "merge_info.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert AutoTokenizer.from_pretrained(str(tmp_path / "m")).convert_tokens_to_ids("w7") == 7
    info = json.loads((tmp_path / "m" / "merge_info.json").read_text())
    assert info["model_class"] == base_cls.__name__ and info["dtype"] == "float32" and info["merged_modules"] == 4
    assert info["adapter_config"]["r"] == 4 and info["adapter_config"]["lora_alpha"] == 8
    assert not list(tmp_path.glob(".m.*")), "staging residue"


def test_bf16_base_stays_bf16(bases, adapter_dir, tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "merge", "--base", bases[torch.bfloat16], "--adapter", adapter_dir, "-o", tmp_path / "m"
    )
    assert code == 0, err
    assert saved_dtypes(tmp_path / "m") == {"BF16"}
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config.get("torch_dtype") or config.get("dtype")) == "bfloat16"
    merged = type(tiny_base_model()).from_pretrained(str(tmp_path / "m"), local_files_only=True, torch_dtype="auto")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(
        logits_of(merged, probe_batch()), adapter_logits(torch.bfloat16, adapter_dir), rtol=0.02, atol=0.02
    )


def test_dtype_option_converts(bases, adapter_dir, tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "merge",
        "--base",
        bases[torch.bfloat16],
        "--adapter",
        adapter_dir,
        "-o",
        tmp_path / "m",
        "--dtype",
        "fp32",
    )
    assert code == 0, err
    assert saved_dtypes(tmp_path / "m") == {"F32"}


def test_compare_reports_the_logit_difference(bases, adapter_dir, tmp_path, capsys):
    checkpoint = adapter_dir.parent  # a checkpoint directory stands for its lora_adapters
    code, out, err = run_cli(
        capsys,
        "merge",
        "--base",
        bases[torch.float32],
        "--adapter",
        checkpoint,
        "-o",
        tmp_path / "m",
        "--compare",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["adapter"] == str(adapter_dir)
    compare = result["compare"]
    assert compare["base_vs_merged"]["max_abs"] > 1e-3, "the merge changed nothing"
    assert compare["adapter_vs_merged"]["max_abs"] < 1e-4
    assert json.loads((tmp_path / "m" / "merge_info.json").read_text())["compare"] == compare

    code, out, _ = run_cli(
        capsys, "merge", "--base", bases[torch.float32], "--adapter", adapter_dir, "-o", tmp_path / "m2", "--compare"
    )
    assert code == 0 and "base vs merged max |diff|" in out and "adapter vs merged max |diff|" in out


def test_boson_multimodal_is_imported_only_to_merge_a_higgs_model():
    code = "import sys, higgs_trainer.cli.verify, higgs_trainer.cli.extract, higgs_trainer.cli.merge, higgs_trainer.cli.convert; print('boson_multimodal' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# bad input


def test_missing_base_is_a_usage_error(adapter_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "merge", "--base", tmp_path / "nope", "--adapter", adapter_dir, "-o", tmp_path / "m")
    assert code == 2
    assert_one_line_error(err, "base model")


def test_missing_required_option_is_a_usage_error(adapter_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "merge", "--adapter", adapter_dir, "-o", tmp_path / "m")
    assert code == 2
    assert_one_line_error(err, "the following arguments are required: --base")


def test_base_without_a_config(adapter_dir, tmp_path, capsys):
    (tmp_path / "base").mkdir()
    code, _, err = run_cli(capsys, "merge", "--base", tmp_path / "base", "--adapter", adapter_dir, "-o", tmp_path / "m")
    assert code == 1
    assert_one_line_error(err, "is not a model directory: no config.json")


def test_truncated_base_weights(bases, adapter_dir, tmp_path, capsys):
    base = pathlib.Path(shutil.copytree(bases[torch.float32], tmp_path / "base"))
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) - 4096])
    code, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter_dir, "-o", tmp_path / "m")
    assert code == 1
    assert_one_line_error(err, "cannot load the base model from")
    assert not (tmp_path / "m").exists()


def test_adapter_config_that_is_not_lora(bases, adapter, tmp_path, capsys):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "merge", "--base", bases[torch.float32], "--adapter", adapter, "-o", tmp_path / "m")
    assert code == 1
    assert_one_line_error(err, "not 'LORA'")


def test_adapter_missing_lora_B(bases, adapter, tmp_path, capsys):
    tensors = load_file(str(adapter / WEIGHTS))
    del tensors[next(k for k in tensors if ".lora_B." in k)]
    save_file(tensors, str(adapter / WEIGHTS))
    code, _, err = run_cli(capsys, "merge", "--base", bases[torch.float32], "--adapter", adapter, "-o", tmp_path / "m")
    assert code == 1
    assert_one_line_error(err, "lack their partner")


def test_base_that_does_not_match_the_adapter(bases, adapter, tmp_path, capsys):
    rename_lora_modules(adapter, "v_proj", "w_proj")
    code, _, err = run_cli(capsys, "merge", "--base", bases[torch.float32], "--adapter", adapter, "-o", tmp_path / "m")
    assert code == 1
    assert_one_line_error(err, "does not fit the base model")
    assert "are not in the base model" in err and not (tmp_path / "m").exists()


def test_output_that_is_not_empty_needs_overwrite(bases, adapter_dir, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["merge", "--base", bases[torch.float32], "--adapter", adapter_dir, "-o", out]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line_error(err, "exists and is not empty")
    assert run_cli(capsys, *args, "--overwrite")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "merge_info.json").is_file()


def test_disk_full_leaves_nothing_half_written(bases, adapter_dir, tmp_path, capsys, monkeypatch):
    def copy_on_a_full_disk(source, target):
        pathlib.Path(target).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(support_files.shutil, "copy2", copy_on_a_full_disk)
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(
        capsys, "merge", "--base", bases[torch.float32], "--adapter", adapter_dir, "-o", tmp_path / "out" / "m"
    )
    assert code == 1
    assert_one_line_error(err, "No space left on device")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.skipif(not HIGGS_STACK, reason="needs boson_multimodal installed, to hide it")
def test_higgs_base_without_boson_multimodal_says_so(bases, adapter_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "boson_multimodal", None)  # import boson_multimodal -> ImportError
    monkeypatch.setitem(sys.modules, "boson_multimodal.model.higgs_audio", None)
    code, _, err = run_cli(
        capsys, "merge", "--base", bases[torch.float32], "--adapter", adapter_dir, "-o", tmp_path / "m", "--in-memory"
    )
    assert code == 1
    assert_one_line_error(err, "boson_multimodal cannot be imported")
    # The streaming merge reads config.json and the tensors only: it needs no boson_multimodal.
    code, _, err = run_cli(
        capsys, "merge", "--base", bases[torch.float32], "--adapter", adapter_dir, "-o", tmp_path / "s"
    )
    assert code == 0, err


@pytest.mark.skipif(HIGGS_STACK, reason="boson_multimodal is installed on the Higgs stack")
def test_higgs_config_without_boson_multimodal_says_so(bases, adapter_dir, tmp_path, capsys):
    base = pathlib.Path(shutil.copytree(bases[torch.float32], tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "higgs_audio"}))
    code, _, err = run_cli(
        capsys, "merge", "--base", base, "--adapter", adapter_dir, "-o", tmp_path / "m", "--in-memory"
    )
    assert code == 1
    assert_one_line_error(err, "is a higgs_audio model, which loads only through boson_multimodal")


@pytest.mark.parametrize("target", ["base", "adapter"])
def test_overwrite_never_replaces_an_input(bases, adapter, capsys, target):
    base = bases[torch.float32]
    output = base if target == "base" else adapter
    before = sorted(p.name for p in output.iterdir())
    code, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", output, "--overwrite")
    assert code == 2
    assert_one_line_error(err, "would replace the input")
    assert sorted(p.name for p in output.iterdir()) == before


def test_an_adapter_with_saved_embedding_layers_merges(tmp_path, capsys):
    # LoRA on the embedding: peft's save_pretrained also writes the embedding's base weight beside the LoRA tensors.
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "base"))
    base = LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert any(".base_layer." in k for k in load_file(str(tmp_path / "adapter" / WEIGHTS)))  # the case under test

    code, _, err = run_cli(
        capsys, "merge", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "-o", tmp_path / "m"
    )
    assert code == 0, err
    merged = LlamaForCausalLM.from_pretrained(str(tmp_path / "m"))
    torch.testing.assert_close(
        logits_of(merged, probe_batch()), logits_of(peft_model, probe_batch()), rtol=1e-4, atol=1e-4
    )


def test_json_output_is_one_document_when_libraries_print_on_import(bases, adapter_dir, tmp_path):
    """A fresh process, where loading the model first imports DeepSpeed (and boson_multimodal on the Higgs stack), which
    print to stdout: the command's stdout is still only its JSON."""
    argv = ["merge", "--base", str(bases[torch.float32]), "--adapter", str(adapter_dir), "-o", str(tmp_path / "m")]
    script = "import sys; from higgs_trainer.cli import main; sys.argv[1:] = " + repr([*argv, "--compare", "--json"])
    script += "; raise SystemExit(main())"
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["compare"]["adapter_vs_merged"]["max_abs"] < 1e-3


def test_output_inside_an_input_is_refused(bases, adapter, capsys):
    base = bases[torch.float32]
    before = sorted(p.name for p in base.iterdir())
    code, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", base / "merged")
    assert code == 2
    assert_one_line_error(err, "lies inside the input")
    assert sorted(p.name for p in base.iterdir()) == before
