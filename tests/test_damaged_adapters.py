"""Every damaged adapter, once: each case runs through the Python API (`inspect_adapter` / `verify_adapter`) and
through `higgs-trainer verify`, and both must name the damage. Real peft adapters, damaged on disk."""

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from higgs_trainer import AdapterVerificationError, find_lora_model, inspect_adapter, verify_adapter
from higgs_trainer.merge.base_model import empty_base_model
from higgs_trainer.training.saving import write_lora_adapters
from tests.testing_cli import run_cli
from tests.testing_models import heads_to_save, make_model, make_speech_model, tiny_base_model, trained_like
from tests.testing_payloads import MaliciousPickle

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def adapter(tmp_path):
    """A sound adapter from make_model(), its lora_B moved off peft's zero init (as training does)."""
    model = trained_like(make_model())
    write_lora_adapters(find_lora_model(model), tmp_path)
    return tmp_path / "lora_adapters"


def rewrite_config(adapter: pathlib.Path, **fields):
    config = json.loads((adapter / CONFIG).read_text())
    config.update(fields)
    (adapter / CONFIG).write_text(json.dumps(config))


def rewrite_tensors(adapter: pathlib.Path, change):
    """Replace the tensors of the adapter file with ``change(tensors)``."""
    tensors = load_file(str(adapter / WEIGHTS))
    save_file({k: v.contiguous() for k, v in change(tensors).items()}, str(adapter / WEIGHTS))


def change_first_lora_a(change):
    def apply(tensors):
        key = next(k for k in sorted(tensors) if ".lora_A." in k)
        return dict(tensors, **{key: change(tensors[key])})

    return apply


def without_lora_b(tensors, every=True):
    dropped = [k for k in tensors if ".lora_B." in k][: None if every else 1]
    return {k: v for k, v in tensors.items() if k not in dropped}


def with_nan(tensors):
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    return tensors


def truncate(adapter: pathlib.Path):
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[: len(data) // 2])


def malicious_pickle(adapter: pathlib.Path):
    (adapter / WEIGHTS).unlink()
    marker = adapter.parent / "pwned"
    torch.save({"base_model.model.x.lora_A.weight": MaliciousPickle(marker)}, adapter / "adapter_model.bin")


# name: (how to damage the adapter directory, the texts the report must hold)
DAMAGE = {
    # the config
    "peft-type-ia3": (lambda a: rewrite_config(a, peft_type="IA3"), ["not 'LORA'"]),
    "peft-type-prefix-tuning": (
        lambda a: rewrite_config(a, peft_type="PREFIX_TUNING"),
        ["has peft_type 'PREFIX_TUNING', not 'LORA'"],
    ),
    "config-missing": (lambda a: (a / CONFIG).unlink(), ["adapter_config.json is missing"]),
    "config-truncated-json": (lambda a: (a / CONFIG).write_text('{"peft_type": "LORA", "r": '), ["not valid JSON"]),
    "config-not-json": (lambda a: (a / CONFIG).write_text("{not json"), ["is not valid JSON"]),
    "dropout-as-text": (
        lambda a: rewrite_config(a, lora_dropout="high"),
        ["lora_dropout='high', not a number from 0 to 1"],
    ),
    "dora-as-text": (lambda a: rewrite_config(a, use_dora="yes"), ["use_dora='yes', not true or false"]),
    "rank-as-text": (lambda a: rewrite_config(a, r="4"), ["r='4', not a positive integer"]),
    "bias-unknown": (lambda a: rewrite_config(a, bias="some"), ["bias='some', not one of"]),
    "modules-to-save-as-text": (
        lambda a: rewrite_config(a, modules_to_save="lm_head"),
        ["modules_to_save='lm_head', not a list"],
    ),
    "layers-as-floats": (lambda a: rewrite_config(a, layers_to_transform=[0.5]), ["layers_to_transform=[0.5]"]),
    "alpha-pattern-as-text": (lambda a: rewrite_config(a, alpha_pattern={"q_proj": "big"}), ["alpha_pattern="]),
    "rank-pattern-malformed": (
        lambda a: rewrite_config(a, rank_pattern=["x"], lora_alpha=None),
        ["not a mapping of patterns to ranks", "lora_alpha=None, not a positive number"],
    ),
    # the config disagrees with the tensors
    "r-disagrees": (lambda a: rewrite_config(a, r=8), ["ranks that disagree"]),
    "rank-pattern-gives-another-rank": (
        lambda a: rewrite_config(a, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}),
        ["disagree with the config (r, rank_pattern)", "layers.0.self_attn.q_proj"],
    ),
    "modules-not-targeted": (  # the v_proj tensors would be skipped by from_pretrained
        lambda a: rewrite_config(a, target_modules=["q_proj"]),
        ["not in the config's target_modules"],
    ),
    # the tensors
    "weights-missing": (lambda a: (a / WEIGHTS).unlink(), ["has no adapter_model.safetensors"]),
    "weights-truncated": (truncate, ["truncated or corrupt"]),
    "malicious-pickle": (malicious_pickle, ["weights_only=True refused it"]),
    "no-lora-b": (lambda a: rewrite_tensors(a, without_lora_b), ["lack their partner"]),
    "one-lora-b-missing": (
        lambda a: rewrite_tensors(a, lambda t: without_lora_b(t, every=False)),
        ["lack their partner"],
    ),
    "wrapper-prefix": (
        lambda a: rewrite_tensors(a, lambda t: {"model." + k: v for k, v in t.items()}),
        ["lack the 'base_model.model.' prefix"],
    ),
    "adapter-name-segment": (
        lambda a: rewrite_tensors(
            a,
            lambda t: {
                k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                for k, v in t.items()
            },  # fmt: skip
        ),
        ["adapter-name segment"],
    ),
    "one-tensor-empty": (
        lambda a: rewrite_tensors(a, change_first_lora_a(lambda t: torch.empty(0))),
        ["empty"],
    ),
    "every-tensor-empty-zero3": (
        lambda a: rewrite_tensors(a, lambda t: {k: torch.empty(0) for k in t}),
        ["are empty"],
    ),
    "nan": (lambda a: rewrite_tensors(a, with_nan), ["hold NaN or inf"]),
    "lora-a-1-d": (
        lambda a: rewrite_tensors(a, change_first_lora_a(lambda t: t.flatten())),
        ["wrong number of dimensions"],
    ),
    "lora-a-3-d": (
        lambda a: rewrite_tensors(a, change_first_lora_a(lambda t: t.unsqueeze(0))),
        ["wrong number of dimensions"],
    ),
    "lora-a-integer": (
        lambda a: rewrite_tensors(a, change_first_lora_a(lambda t: (t * 100).to(torch.int32))),
        ["not floating point"],
    ),
}


def assert_api_reports(directory, texts):
    summary = inspect_adapter(directory)
    assert not summary.ok
    for text in texts:
        assert any(text in problem for problem in summary.problems), summary.problems
    with pytest.raises(AdapterVerificationError, match="failed verification") as info:
        verify_adapter(directory)
    assert all(text in str(info.value) for text in texts), str(info.value)
    assert isinstance(info.value, ValueError)


def assert_cli_reports(capsys, directory, texts):
    code, out, err = run_cli(capsys, "verify", directory)
    assert code == 1, out + err
    assert all(text in out for text in texts), out
    assert err.strip().splitlines() == ["higgs-trainer verify: 1 of 1 adapter(s) failed verification"], err


@pytest.mark.parametrize("through", ["api", "cli"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_adapter_is_reported_with_its_damage(adapter, capsys, damage, through):
    damage_adapter, texts = DAMAGE[damage]
    damage_adapter(adapter)
    if through == "api":
        assert_api_reports(adapter, texts)
    else:
        assert_cli_reports(capsys, adapter, texts)
    assert not (adapter.parent / "pwned").exists()  # a malicious pickle never runs


@pytest.mark.parametrize("through", ["api", "cli"])
def test_the_undamaged_adapter_passes(adapter, capsys, through):
    if through == "api":
        assert verify_adapter(adapter).ok
    else:
        assert run_cli(capsys, "verify", adapter)[0] == 0


def test_the_malicious_pickle_is_live(tmp_path):
    """Control for the malicious-pickle case: an unsafe load runs the payload."""
    marker, path = tmp_path / "control", tmp_path / "control.bin"
    torch.save({"x": MaliciousPickle(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


# modules_to_save heads, checked the way LoRA pairs are (tests.testing_models.heads_to_save: three heads on both stacks)
HEADS = heads_to_save(tiny_base_model())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    tiny_base_model().save_pretrained(str(directory))
    return directory


@pytest.fixture
def heads_adapter(tmp_path):
    """A sound adapter whose config lists three trained heads in modules_to_save, all saved."""
    model = trained_like(make_speech_model(["q_proj", "v_proj"], HEADS))
    write_lora_adapters(find_lora_model(model), tmp_path)
    return tmp_path / "lora_adapters"


def head_key(tensors, head):
    return next(k for k in sorted(tensors) if k.startswith(f"base_model.model.{head}.") and ".lora_" not in k)


def drop_head(head):
    return lambda tensors: {k: v for k, v in tensors.items() if not k.startswith(f"base_model.model.{head}.")}


def integer_head(tensors):
    key = head_key(tensors, HEADS[0])
    return dict(tensors, **{key: (tensors[key] * 100).to(torch.int32)})


# name: (damage, texts without --base, texts with --base)
HEAD_DAMAGE = {
    "head-integer": (
        lambda a: rewrite_tensors(a, integer_head),
        ["are not floating point", HEADS[0]],
        ["are not floating point", "int32 vs float32"],
    ),
    "listed-head-missing": (
        lambda a: rewrite_tensors(a, drop_head(HEADS[0])),
        [f"lists modules_to_save ['{HEADS[0]}'] but the file holds no tensor of them"],
        ["whose weights the file lacks", HEADS[0]],
    ),
    "config-lists-1-of-3-heads": (
        lambda a: rewrite_config(a, modules_to_save=HEADS[:1]),
        ["2 full weight(s) in the file belong to no module of the config's modules_to_save", HEADS[1], HEADS[2]],
        ["2 full weight(s) in the file belong to no module of the config's modules_to_save"],
    ),
}


@pytest.mark.parametrize("base", [False, True], ids=["alone", "with-base"])
@pytest.mark.parametrize("through", ["api", "cli"])
@pytest.mark.parametrize("damage", sorted(HEAD_DAMAGE))
def test_a_damaged_modules_to_save_head_is_reported(heads_adapter, base_dir, capsys, damage, through, base):
    damage_adapter, texts, base_texts = HEAD_DAMAGE[damage]
    damage_adapter(heads_adapter)
    if not base and through == "api":
        assert_api_reports(heads_adapter, texts)
        return
    if not base:
        assert_cli_reports(capsys, heads_adapter, texts)
        return
    if through == "api":
        summary = inspect_adapter(heads_adapter, base_model=empty_base_model(base_dir))
        report = "; ".join(summary.problems)
    else:
        code, report, err = run_cli(capsys, "verify", heads_adapter, "--base", base_dir)
        assert code == 1, report + err
    assert all(text in report for text in base_texts), report


@pytest.mark.parametrize("base", [False, True], ids=["alone", "with-base"])
def test_the_undamaged_heads_adapter_passes(heads_adapter, base_dir, capsys, base):
    code, out, err = run_cli(capsys, "verify", heads_adapter, *(["--base", base_dir] if base else []))
    assert code == 0, out + err
    assert f"modules_to_save {', '.join(sorted(HEADS))}" in out


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "in-memory"])
def test_merge_refuses_a_config_listing_1_of_3_saved_heads(heads_adapter, base_dir, tmp_path, capsys, streaming):
    """verify and both merges agree: the streaming merge used to write all three heads while reporting one."""
    rewrite_config(heads_adapter, modules_to_save=HEADS[:1])
    argv = ["merge", "--base", base_dir, "--adapter", heads_adapter, "--output", tmp_path / "merged"]
    code, out, err = run_cli(capsys, *argv, *([] if streaming else ["--in-memory"]))
    assert code == 1 and "belong to no module of the config's modules_to_save" in err, out + err
    assert not (tmp_path / "merged").exists()
