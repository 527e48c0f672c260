"""The streaming merge (`higgs-trainer merge`'s default) against peft's own `merge_and_unload`, bit for bit.

Each case saves a tiny real base with save_pretrained and a peft adapter with random (non-zero)
LoRA weights, streams the merge, and compares every merged tensor with torch.equal to what
`PeftModel.from_pretrained(...).merge_and_unload()` computes from the same files.
"""

import json
import pathlib
import shutil
import sys

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from higgs_trainer.files.safetensors_files import read_stored_tensors, safetensors_weight_files, shard_plan
from higgs_trainer.merge import compare as merge_compare
from higgs_trainer.merge import merging
from higgs_trainer.merge import streaming as streaming_merge
from higgs_trainer.merge.arithmetic import Scratch, merge_linear, row_blocks
from higgs_trainer.merge.base_model import model_init_kwargs
from higgs_trainer.merge.plan import LoraDelta
from tests.testing_cli import assert_one_line_error, run_cli
from tests.testing_models import HIGGS_STACK, VOCAB, probe_batch, tiny_base_model

LLAMA = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
)  # fmt: skip
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(dtype=torch.float32):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(dtype)


def gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def higgs_v2(dtype=torch.float32):
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    torch.manual_seed(0)
    config = HiggsAudioV2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, num_codebooks=4, codebook_size=30,
        audio_stream_bos_id=30, audio_stream_eos_id=31, audio_token_id=250, audio_bos_token_id=251,
        audio_delay_token_id=252, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return HiggsAudioV2ForConditionalGeneration(config).to(dtype)


def save_pair(tmp_path, model, config, max_shard_size=None):
    """Save ``model`` as the base and a LoRA adapter on it (every LoRA weight random) beside it."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(tmp_path / "base"), **kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "base", tmp_path / "adapter"


def peft_merged(cls, base, adapter, dtype):
    """What peft computes: the base loaded as saved, the adapter applied, merge_and_unload."""
    model = cls.from_pretrained(str(base), torch_dtype=dtype, **model_init_kwargs(base, cls))
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def output_tensors(directory):
    tensors = {}
    for file in safetensors_weight_files(pathlib.Path(directory)):
        tensors.update(load_file(str(file)))
    return tensors


def base_keys(directory):
    return set(read_stored_tensors(pathlib.Path(directory), safetensors_weight_files(pathlib.Path(directory))))


def assert_bit_equal_to_peft(cls, base, adapter, out, dtype, changed_at_least=1):
    expected = peft_merged(cls, base, adapter, dtype).state_dict()
    actual = output_tensors(out)
    assert set(actual) == base_keys(base), "the output holds exactly the base's tensors"
    original = output_tensors(base)
    changed = 0
    for key, value in actual.items():
        assert value.dtype == expected[key].dtype, key
        assert torch.equal(value, expected[key]), f"{key} differs from peft's merge"
        changed += not torch.equal(value, original[key])
    assert changed >= changed_at_least, "the merge changed nothing"
    return actual


def load_output(cls, out):
    model, info = cls.from_pretrained(
        str(out), output_loading_info=True, torch_dtype="auto", **model_init_kwargs(out, cls)
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@torch.no_grad()
def logits(model):
    out = model(**probe_batch())
    return (out["logits"] if isinstance(out, dict) else out.logits).float()


CASES = {
    "linear, all projections": (llama, dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR), 14),
    "rsLoRA with rank and alpha patterns": (
        llama,
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
            alpha_pattern={"down_proj": 3},
        ),  # fmt: skip
        6,
    ),
    "lora_bias": (
        lambda dtype: gpt2(dtype),
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_bias=True, fan_in_fan_out=True),
        8,
    ),
    "fan_in_fan_out (GPT-2 Conv1D, square c_proj)": (
        lambda dtype: gpt2(dtype),
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        8,
    ),
    "embedding LoRA (saved with its base layer)": (
        llama,
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
        3,
    ),
    "modules_to_save": (llama, dict(r=2, lora_alpha=4, target_modules=["o_proj"], modules_to_save=["lm_head"]), 3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_merge_is_bit_for_bit_peft(case, dtype, tmp_path, capsys):
    make, config, changed = CASES[case]
    model = make(dtype)
    cls = type(model)
    base, adapter = save_pair(tmp_path, model, LoraConfig(lora_dropout=0.0, **config))
    code, out, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    assert code == 0, err
    assert "(streaming)" in out
    assert_bit_equal_to_peft(cls, base, adapter, tmp_path / "m", dtype, changed)
    merged = load_output(cls, tmp_path / "m")
    assert {p.dtype for p in merged.parameters()} == {dtype}
    assert torch.equal(logits(merged), logits(peft_merged(cls, base, adapter, dtype)))
    adapter_logits = logits(PeftModel.from_pretrained(cls.from_pretrained(str(base), torch_dtype=dtype), str(adapter)))
    if dtype == torch.float32:
        torch.testing.assert_close(logits(merged), adapter_logits, rtol=1e-4, atol=1e-4)
    else:  # the adapter's own weights are float32 in peft; merged into bf16 they are rounded
        assert (logits(merged) - adapter_logits).abs().mean() < 0.02 * adapter_logits.abs().mean()
    assert not list(tmp_path.glob(".m.*")), "staging residue"


def test_the_project_model_merges_bit_for_bit(tmp_path, capsys):
    """The stack's own model (the real HiggsAudioModel on the Higgs stack), bf16, LoRA on attention and MLPs."""
    model = tiny_base_model().to(torch.bfloat16)
    cls = type(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base, adapter = save_pair(tmp_path, model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    code, out, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    assert code == 0, err
    assert f"({cls.__name__}, bfloat16)" in out
    assert_bit_equal_to_peft(cls, base, adapter, tmp_path / "m", torch.bfloat16, 14)
    merged = load_output(cls, tmp_path / "m")
    assert torch.equal(logits(merged), logits(peft_merged(cls, base, adapter, torch.bfloat16)))
    info = json.loads((tmp_path / "m" / "merge_info.json").read_text())
    assert info["method"] == "streaming" and info["model_class"] == cls.__name__ and info["dtype"] == "bfloat16"


@pytest.mark.skipif(HIGGS_STACK, reason="transformers' HiggsAudioV2ForConditionalGeneration needs the newest stack")
def test_transformers_higgs_audio_v2_merges_bit_for_bit(tmp_path, capsys):
    model = higgs_v2(torch.bfloat16)
    cls = type(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    base, adapter = save_pair(tmp_path, model, config)
    assert any(k.startswith("model.layers.") for k in base_keys(base))  # the transformers layout
    code, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    assert code == 0, err
    assert_bit_equal_to_peft(cls, base, adapter, tmp_path / "m", torch.bfloat16, 6)
    load_output(cls, tmp_path / "m")


def test_sharded_base_and_sharded_output(tmp_path, capsys):
    model = llama(torch.bfloat16)
    cls = type(model)
    base, adapter = save_pair(tmp_path, model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR), "40KB")
    assert (base / "model.safetensors.index.json").is_file()
    code, _, err = run_cli(
        capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m", "--max-shard-size", "30KB"
    )
    assert code == 0, err
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "m" / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in output_tensors(base).values())
    assert_bit_equal_to_peft(cls, base, adapter, tmp_path / "m", torch.bfloat16, 14)
    load_output(cls, tmp_path / "m")


def test_shard_plan_keeps_order_and_puts_a_large_tensor_alone():
    assert shard_plan({"a": 3, "b": 3, "c": 10, "d": 1, "e": 1}, 6) == [["a", "b"], ["c"], ["d", "e"]]


def test_dtype_option_casts_then_merges_like_peft(tmp_path, capsys):
    model = llama(torch.bfloat16)
    base, adapter = save_pair(tmp_path, model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    code, _, err = run_cli(
        capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m", "--dtype", "fp32"
    )
    assert code == 0, err
    assert_bit_equal_to_peft(type(model), base, adapter, tmp_path / "m", torch.float32, 2)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"


def test_in_memory_option_and_pickle_bases_use_peft(tmp_path, capsys):
    model = llama()
    base, adapter = save_pair(tmp_path, model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    result = merging.merge_adapter(base, adapter, tmp_path / "m", streaming=False)
    assert result.method == "in-memory"
    streamed = merging.merge_adapter(base, adapter, tmp_path / "s")
    assert streamed.method == "streaming"
    pickled = pathlib.Path(shutil.copytree(base, tmp_path / "pickled"))
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    assert merging.merge_adapter(pickled, adapter, tmp_path / "p").method == "in-memory"
    code, _, err = run_cli(capsys, "merge", "--base", pickled, "--adapter", adapter, "-o", tmp_path / "q", "--json")
    assert code == 0, err


# refusals: one line, naming the in-memory merge where that one can do it, and nothing left behind


def _refused(capsys, tmp_path, base, adapter, text, code=1):
    (tmp_path / "out").mkdir(exist_ok=True)
    capsys.readouterr()  # what saving the inputs printed
    status, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "out" / "m")
    assert status == code
    assert_one_line_error(err, text)
    assert list((tmp_path / "out").iterdir()) == [], "something was left behind"
    return err


def test_dora_is_refused_with_the_in_memory_path(tmp_path, capsys):
    base, adapter = save_pair(
        tmp_path, llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    )
    err = _refused(capsys, tmp_path, base, adapter, "DoRA (use_dora)")
    assert "--in-memory" in err


def test_a_base_changing_initialisation_is_refused(tmp_path, capsys):
    base, adapter = save_pair(tmp_path, llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    assert "--in-memory" in _refused(capsys, tmp_path, base, adapter, "init_lora_weights='pissa'")


def test_an_adapter_tensor_without_a_base_tensor_is_refused(tmp_path, capsys):
    base, adapter = save_pair(
        tmp_path, llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight_typo"] = tensors.pop("base_model.model.lm_head.weight")
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    _refused(capsys, tmp_path, base, adapter, "match no tensor of the base model")


def test_truncated_shard_is_refused_before_anything_is_written(tmp_path, capsys):
    base, adapter = save_pair(tmp_path, llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), "40KB")
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _refused(capsys, tmp_path, base, adapter, "is truncated or corrupt")


def test_a_merge_that_overflows_leaves_nothing(tmp_path, capsys):
    base, adapter = save_pair(tmp_path, llama(torch.float16), LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file(
        {k: v * 1e8 if "lora_B" in k else v for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors")
    )
    _refused(capsys, tmp_path, base, adapter, "holds NaN or inf")


def test_forcing_streaming_on_a_pickle_base_says_what_to_do(tmp_path):
    base, adapter = save_pair(tmp_path, llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    with pytest.raises(merging.UsageError, match="no safetensors weights.*--in-memory"):
        merging.merge_adapter(base, adapter, tmp_path / "m", streaming=True)


def _compare(capsys, base, adapter, out):
    code, stdout, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", out, "--compare", "--json")
    assert code == 0, err
    return json.loads(stdout)["compare"]  # one JSON document: what libraries print goes to stderr


def test_compare_checks_the_audio_head_of_the_project_model(tmp_path, capsys):
    """--compare on a Higgs model (both stacks' project model) also runs an audio-out probe."""
    model = tiny_base_model()
    targets = ["q_proj", "v_proj", "down_proj"]
    base, adapter = save_pair(tmp_path, model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    compare = _compare(capsys, base, adapter, tmp_path / "m")
    assert compare["base_vs_merged"]["max_abs"] > 1e-3 and compare["adapter_vs_merged"]["max_abs"] < 1e-3
    assert compare["audio_probe_frames"] > 0
    assert compare["audio_base_vs_merged"]["max_abs"] > 1e-3, "the adapter changed no audio logit"
    assert compare["audio_adapter_vs_merged"]["max_abs"] < 1e-3


@pytest.mark.skipif(HIGGS_STACK, reason="transformers' HiggsAudioV2ForConditionalGeneration needs the newest stack")
def test_compare_checks_the_audio_head_of_transformers_higgs_audio_v2(tmp_path, capsys):
    base, adapter = save_pair(tmp_path, higgs_v2(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    compare = _compare(capsys, base, adapter, tmp_path / "m")
    assert compare["audio_base_vs_merged"]["max_abs"] > 1e-3
    assert compare["audio_adapter_vs_merged"]["max_abs"] < 1e-3


def test_a_wider_model_and_a_large_rank_merge_bit_for_bit(tmp_path, capsys):
    """Products of rank 64 over 256-wide layers: the streaming merge's single-threaded products equal peft's."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**LLAMA, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 1})
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    base, adapter = save_pair(tmp_path, model, LoraConfig(r=64, lora_alpha=16, target_modules=ALL_LINEAR))
    code, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    assert code == 0, err
    assert_bit_equal_to_peft(type(model), base, adapter, tmp_path / "m", torch.bfloat16, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("blocks", [True, False], ids=["in-blocks", "whole"])
def test_merge_linear_gives_the_bits_of_peft_s_in_place_add(dtype, blocks):
    """200 rows: two blocks of 64 and one of 72. Whole (as when a shape's probe finds the blocks differ) or in blocks,
    the weight gets what peft's ``Linear.merge`` gives it: ``weight += (B @ A) * scaling`` on torch's own kernels."""
    torch.manual_seed(0)
    weight = (torch.randn(200, 96) * 0.02).to(dtype)
    delta = LoraDelta("w", torch.randn(8, 96), torch.randn(200, 8) * 0.05, scaling=1.7)
    expected = weight.clone()
    expected += (delta.b @ delta.a) * delta.scaling
    scratch = Scratch()
    if not blocks:
        scratch.blocks_exact[(200, 96, 8)] = False
    merge_linear(weight, delta, scratch)
    assert (200, 96, 8) in scratch.blocks_exact, "the shape was not probed"
    assert torch.equal(weight, expected)
    assert row_blocks(200) == [(0, 64), (64, 128), (128, 200)]


def test_layers_whose_rows_are_not_a_multiple_of_the_block_merge_bit_for_bit(tmp_path, capsys):
    """Uneven blocks (intermediate 200 = 64 + 64 + 72 rows) through the whole merge, fp16, against peft."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**LLAMA, "hidden_size": 128, "intermediate_size": 200, "num_hidden_layers": 1})
    model = transformers.LlamaForCausalLM(config).to(torch.float16)
    base, adapter = save_pair(tmp_path, model, LoraConfig(r=8, lora_alpha=12, target_modules=ALL_LINEAR))
    with torch.no_grad():  # modest LoRA weights: the fp16 merge must stay finite
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        save_file({k: v * 0.05 for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors"))
    code, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    assert code == 0, err
    assert_bit_equal_to_peft(type(model), base, adapter, tmp_path / "m", torch.float16, 7)


@pytest.mark.parametrize("size", ["0", "-1", "abc", "1e3", "5 parsecs", "0.5"])
def test_a_max_shard_size_that_is_not_a_size_is_a_usage_error(tmp_path, capsys, size):
    # These once gave "unexpected ValueError" after the adapter was verified, and 0 one file per tensor.
    base, adapter = save_pair(tmp_path, llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    code, _, err = run_cli(
        capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m", "--max-shard-size", size
    )
    assert code == 2
    assert_one_line_error(err, "argument --max-shard-size: max shard size")
    assert "500MB, 5GB, 1.5GB, 2GiB" in err and not (tmp_path / "m").exists()


@pytest.mark.parametrize("in_memory", [False, True], ids=["streaming", "in-memory (pytorch_model.bin base)"])
def test_max_shard_size_is_honoured_on_both_paths(tmp_path, capsys, in_memory):
    base, adapter = save_pair(tmp_path, llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    if in_memory:  # a pickled base has no streaming path: the in-memory one once ignored --max-shard-size
        torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
        (base / "model.safetensors").unlink()
    total = sum(t.numel() * t.element_size() for t in llama().state_dict().values())
    for size, out in (("0.02MB", "small"), (str(10 * total), "one")):
        code, stdout, err = run_cli(
            capsys,
            "merge",
            "--base",
            base,
            "--adapter",
            adapter,
            "-o",
            tmp_path / out,
            "--max-shard-size",
            size,
            "--json",
        )
        assert code == 0, err
        assert json.loads(stdout)["method"] == ("in-memory" if in_memory else "streaming")
    shards = sorted((tmp_path / "small").glob("model-*.safetensors"))
    assert len(shards) > 3
    for shard in shards:  # at most 20 kB of tensors, or one larger tensor alone
        tensors = load_file(str(shard))
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 20_000
    assert json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())["weight_map"]
    assert [f.name for f in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]


@pytest.mark.skipif(not HIGGS_STACK, reason="boson_multimodal's collator, which imports librosa, is on the Higgs stack")
def test_compare_without_librosa_keeps_the_merge_and_names_the_extra(tmp_path, capsys, monkeypatch):
    # Without librosa, `merge --compare` once threw the finished merge away ("unexpected ModuleNotFoundError").
    base, adapter = save_pair(tmp_path, tiny_base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    monkeypatch.setitem(sys.modules, "librosa", None)  # `import librosa` raises ImportError, as when not installed
    for name in [n for n in sys.modules if n.startswith("boson_multimodal.data_collator")]:
        monkeypatch.delitem(sys.modules, name)  # imported again, so the collator's `import librosa` runs
    code, stdout, err = run_cli(
        capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m", "--compare", "--json"
    )
    assert code == 0, err
    assert len(err.strip().splitlines()) == 1 and "librosa" in err, err
    assert 'pip install "higgs-trainer[compare]"' in err
    compare = json.loads(stdout)["compare"]
    assert compare["base_vs_merged"]["max_abs"] > 1e-3 and compare["adapter_vs_merged"]["max_abs"] < 1e-3
    assert "librosa" in compare["audio_probe_skipped"] and "audio_base_vs_merged" not in compare
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "m" / "merge_info.json").read_text())["compare"] == compare


def test_a_failing_compare_keeps_the_merge_and_says_so(tmp_path, capsys, monkeypatch):
    base, adapter = save_pair(tmp_path, llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    monkeypatch.setattr(merge_compare, "PeftModel", None)  # an AttributeError inside the check, after the merge
    code, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m", "--compare")
    assert code == 1
    assert_one_line_error(err, f"the merged model in {tmp_path / 'm'} is complete (kept), but --compare failed")
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "merge_info.json").is_file()


@pytest.mark.parametrize(
    "failure, message",
    [
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "failed: DefaultCPUAllocator"),
        (MemoryError("out of memory"), "failed: out of memory"),
        (TypeError("a bug"), "unexpected TypeError: a bug"),
    ],
)
def test_every_failure_of_the_streaming_merge_is_one_line(tmp_path, capsys, monkeypatch, failure, message):
    # Only OSError used to become a MergeError; a RuntimeError from torch was "unexpected".
    base, adapter = save_pair(tmp_path, llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))

    def fails(*args, **kwargs):
        raise failure

    monkeypatch.setattr(streaming_merge, "merged_tensor", fails)
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "out" / "m")
    assert code == 1
    assert_one_line_error(err, message)
    assert ("unexpected" in err) == isinstance(failure, TypeError)
    assert list((tmp_path / "out").iterdir()) == []
