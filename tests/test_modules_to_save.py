"""Everything a voice run trains is saved, checked, rescued and merged: ``modules_to_save`` heads and LoRA on ``audio_mlp``.

On the Higgs stack the model is the real HiggsAudioModel (DualFFN on both layers) trained with its
text + audio loss; ``modules_to_save`` are the audio head, the text head and the codebook
embeddings. The newest stack runs the same paths on its own model (``tests.testing_models.heads_to_save``).

Runs (module-scoped, 4 steps, checkpoints at 2 and 4):
* ``heads``: LoRA on q/v plus the heads in ``modules_to_save``;
* ``dualffn``: the community default targets gate/up/down_proj (both ``mlp`` and ``audio_mlp``) plus the heads;
* ``audio_mlp``: LoRA on the DualFFN audio path only, no heads: only the audio loss can train it.
"""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from higgs_trainer import AdapterVerificationError, HiggsLoraTrainer, find_lora_model, verify_adapter
from higgs_trainer.merge.base_model import model_init_kwargs
from higgs_trainer.training.saving import clone_shared_tensors
from tests.testing_cli import run_cli
from tests.testing_models import (
    SpeechSamples,
    adapter_shapes,
    assert_resumed_exactly,
    assert_same_tensors,
    heads_to_save,
    make_speech_model,
    speech_collator,
    speech_logits_of,
    speech_probe,
    tiny_base_model,
    training_args,
)

WEIGHTS = "adapter_model.safetensors"
HEADS = heads_to_save(tiny_base_model())
KINDS = {
    "heads": (["q_proj", "v_proj"], HEADS),
    "dualffn": (["gate_proj", "up_proj", "down_proj"], HEADS),
    "audio_mlp": (r".*\.audio_mlp\.(gate|up|down)_proj", None),
}
KIND_PARAMS = [
    "heads",
    "dualffn",
    "audio_mlp",
]


class RecordAdapter(TrainerCallback):
    """The live adapter (LoRA and modules_to_save tensors) at the end of every step."""

    def __init__(self):
        self.by_step = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        peft_model = find_lora_model(model).model
        state_dict = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        self.by_step[state.global_step] = {k: v.detach().clone() for k, v in state_dict.items()}


def speech_trainer(model, out, trainer_cls=HiggsLoraTrainer, callbacks=(), adapter_only=False, **overrides):
    extra = {"adapter_only_checkpoints": True} if adapter_only else {}
    return trainer_cls(
        model=model,
        args=training_args(out, **overrides),
        train_dataset=SpeechSamples(),
        data_collator=speech_collator(),
        callbacks=list(callbacks),
        **extra,
    )


class Run:
    def __init__(self, kind, out):
        targets, modules_to_save = KINDS[kind]
        self.kind, self.out, self.targets, self.modules_to_save = kind, out, targets, modules_to_save
        self.model = make_speech_model(targets, modules_to_save)
        self.recorder = RecordAdapter()
        trainer = speech_trainer(self.model, out, callbacks=[self.recorder])
        trainer.train()
        trainer.save_model()
        self.logits = speech_logits_of(self.model, speech_probe())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = Run(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    tiny_base_model().save_pretrained(str(directory))
    return directory


def assert_logits_equal(actual, expected, tol=1e-5):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=tol, atol=tol, msg=name)


def on_bare_base(adapter_dir):
    return PeftModel.from_pretrained(tiny_base_model(), str(adapter_dir))


def head_keys(tensors):
    return sorted(k for k in tensors if ".lora_" not in k)


def expected_head_keys(modules_to_save):
    """The adapter keys of the whole weights of ``modules_to_save``, as the base model names them (a module's weight
    may sit in a submodule: HiggsAudioV2's ``model.embed_audio_tokens.embed_audio_tokens.weight``)."""
    names = tiny_base_model().state_dict()
    return sorted(
        f"base_model.model.{name}" for m in modules_to_save or [] for name in names if name.startswith(m + ".")
    )


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_every_checkpoint_holds_the_modules_to_save_and_lora_of_its_step(runs, kind):
    run = runs(kind)
    base_weights = dict(tiny_base_model().named_parameters())
    for step, directory in ((2, run.out / "checkpoint-2"), (4, run.out / "checkpoint-4"), (4, run.out)):
        adapter = directory / "lora_adapters"
        verify_adapter(adapter)
        saved = load_file(str(adapter / WEIGHTS))
        assert_same_tensors(saved, run.recorder.by_step[step])
        heads = head_keys(saved)
        assert heads == expected_head_keys(run.modules_to_save)
        for key in heads:  # full shape, and trained: not the base's weight any more
            base = base_weights[key[len("base_model.model.") :]]
            assert saved[key].shape == base.shape and not torch.equal(saved[key], base.detach()), key
    if kind != "heads":
        audio = [k for k in saved if ".audio_mlp." in k and ".lora_B." in k]
        assert len(audio) == 6 and all(saved[k].any() for k in audio)  # both stacks' models have DualFFN layers


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_saved_adapter_reproduces_text_and_audio_logits_on_a_bare_base(runs, kind):
    run = runs(kind)
    base_logits = speech_logits_of(tiny_base_model(), speech_probe())
    for name in run.logits:  # training changed both heads' outputs (for audio_mlp: the audio loss trained it)
        assert not torch.allclose(run.logits[name], base_logits[name], atol=1e-4), name
    assert_logits_equal(speech_logits_of(on_bare_base(run.out / "lora_adapters"), speech_probe()), run.logits)


def test_post_save_verification_expects_every_module_to_save(runs, tmp_path):
    run = runs("heads")
    expected = adapter_shapes(find_lora_model(run.model).model)
    assert sorted(k for k in expected if ".lora_" not in k) == head_keys(run.recorder.by_step[4])
    adapter = shutil.copytree(run.out / "lora_adapters", tmp_path / "adapter")
    tensors = load_file(str(adapter / WEIGHTS))
    dropped = head_keys(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(adapter / WEIGHTS))
    with pytest.raises(Exception, match="missing from the file") as info:
        verify_adapter(adapter, expected)
    assert dropped in str(info.value)


def test_verify_reports_modules_to_save_and_checks_their_shapes_against_the_base(runs, base_dir, tmp_path, capsys):
    run = runs("heads")
    code, out, _ = run_cli(capsys, "verify", run.out, "--base", base_dir)
    assert code == 0, out
    assert out.count(f"modules_to_save {', '.join(sorted(HEADS))}") == 3, out
    code, out, _ = run_cli(capsys, "verify", run.out / "lora_adapters", "--json")
    assert json.loads(out)["results"][0]["modules_to_save"] == sorted(HEADS)

    adapter = shutil.copytree(run.out / "lora_adapters", tmp_path / "adapter")
    tensors = load_file(str(adapter / WEIGHTS))
    key = f"base_model.model.{HEADS[0]}.weight"
    tensors[key] = tensors[key][:-1].contiguous()  # one row short: it no longer fits the base
    save_file(tensors, str(adapter / WEIGHTS))
    code, out, _ = run_cli(capsys, "verify", adapter, "--base", base_dir)
    assert code == 1 and "do not fit the base model" in out and HEADS[0] in out, out


def test_verify_fails_an_adapter_whose_config_promises_modules_to_save_it_lacks(runs, tmp_path, capsys):
    run = runs("heads")
    adapter = shutil.copytree(run.out / "lora_adapters", tmp_path / "adapter")
    tensors = load_file(str(adapter / WEIGHTS))
    save_file({k: v for k, v in tensors.items() if ".lora_" in k}, str(adapter / WEIGHTS))
    code, out, _ = run_cli(capsys, "verify", adapter)
    assert code == 1 and "modules_to_save" in out and "none of them is in the file" in out, out


class PlainWrapperTrainer(Trainer):
    """The old way: plain Trainer on the wrapper writes only model.safetensors (shared tensors untied for safetensors)."""

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, clone_shared_tensors(self.model.state_dict()))


@pytest.mark.parametrize("kind", ["heads", "audio_mlp"])
def test_extract_rescues_modules_to_save_and_audio_lora_from_a_full_checkpoint(runs, kind, tmp_path, capsys):
    run = runs(kind)
    targets, modules_to_save = KINDS[kind]
    model = make_speech_model(targets, modules_to_save)
    speech_trainer(model, tmp_path / "old", trainer_cls=PlainWrapperTrainer, max_steps=2, save_steps=2).train()
    checkpoint = tmp_path / "old" / "checkpoint-2"
    assert not (checkpoint / "lora_adapters").exists()
    trained = speech_logits_of(model, speech_probe())

    code, out, err = run_cli(capsys, "extract", checkpoint, "-o", tmp_path / "rescued", "--lora-alpha", "8")
    assert code == 0, err
    rescued = load_file(str(tmp_path / "rescued" / WEIGHTS))
    assert head_keys(rescued) == expected_head_keys(modules_to_save)
    assert_logits_equal(speech_logits_of(on_bare_base(tmp_path / "rescued"), speech_probe()), trained)
    assert run_cli(capsys, "verify", tmp_path / "rescued")[0] == 0

    # with the run's own adapter_config.json (it lists modules_to_save) the result is the same
    config = run.out / "lora_adapters" / "adapter_config.json"
    args = ("extract", checkpoint, "-o", tmp_path / "with-config", "--adapter-config", config)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert_same_tensors(load_file(str(tmp_path / "with-config" / WEIGHTS)), rescued)


@pytest.mark.parametrize("kind", ["dualffn", "audio_mlp"])
def test_merge_applies_modules_to_save_and_audio_lora(runs, kind, base_dir, tmp_path, capsys):
    run = runs(kind)
    code, out, err = run_cli(capsys, "merge", "--base", base_dir, "--adapter", run.out, "-o", tmp_path / "m")
    assert code == 0, err
    cls = type(tiny_base_model())
    merged = cls.from_pretrained(str(tmp_path / "m"), local_files_only=True, **model_init_kwargs(tmp_path / "m", cls))
    weights = dict(merged.named_parameters())
    trained = run.recorder.by_step[4]
    for key in head_keys(trained):
        torch.testing.assert_close(weights[key[len("base_model.model.") :]], trained[key], rtol=0, atol=0, msg=key)
    if run.modules_to_save:
        assert f"{len(run.modules_to_save)} modules_to_save" in out, out
    assert_logits_equal(speech_logits_of(merged, speech_probe()), run.logits, tol=1e-4)


@pytest.mark.parametrize("adapter_only", [False, True])
def test_resume_from_checkpoint_2_gives_the_uninterrupted_adapter(runs, adapter_only, tmp_path):
    run = runs("dualffn")
    targets, modules_to_save = KINDS["dualffn"]
    source = run.out
    if adapter_only:  # an adapter-only run: its checkpoint-2 holds lora_adapters (with the heads) and no base weights
        source = tmp_path / "adapter-only"
        speech_trainer(make_speech_model(targets, modules_to_save), source, adapter_only=True).train()
        assert not (source / "checkpoint-2" / "model.safetensors").exists()
        assert head_keys(load_file(str(source / "checkpoint-2" / "lora_adapters" / WEIGHTS)))
    model = make_speech_model(targets, modules_to_save)
    with torch.no_grad():  # other trainable weights than the run had: the resume must replace every one of them
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    trainer = speech_trainer(model, tmp_path / "resumed", adapter_only=adapter_only)
    trainer.train(resume_from_checkpoint=str(source / "checkpoint-2"))
    trainer.save_model()
    assert_resumed_exactly(tmp_path / "resumed", run.recorder.by_step[4])


def _layout_shapes(**extra):
    shapes = {
        "model.base_model.model.q.lora_A.default.weight": (4, 8),
        "model.base_model.model.q.lora_B.default.weight": (8, 4),
        "model.base_model.model.q.base_layer.weight": (8, 8),
        "model.base_model.model.head.original_module.weight": (16, 8),
    }
    shapes.update(extra)
    return shapes


def test_find_lora_layout_takes_the_trained_copies_and_refuses_empty_or_foreign_ones():
    from higgs_trainer.errors import CheckpointError
    from higgs_trainer.files.checkpoint import find_lora_layout

    layout = find_lora_layout(_layout_shapes(**{"model.base_model.model.head.modules_to_save.default.weight": (16, 8)}))
    assert layout.modules_to_save == ("head",)
    assert layout.keys["model.base_model.model.head.modules_to_save.default.weight"] == "base_model.model.head.weight"
    assert "model.base_model.model.head.original_module.weight" not in layout.keys  # the frozen original is not read
    with pytest.raises(CheckpointError, match="empty"):
        find_lora_layout(_layout_shapes(**{"model.base_model.model.head.modules_to_save.default.weight": (0,)}))
    with pytest.raises(CheckpointError, match="another adapter"):
        find_lora_layout(_layout_shapes(**{"model.base_model.model.head.modules_to_save.other.weight": (16, 8)}))


def test_extract_with_a_config_whose_modules_to_save_do_not_match_is_refused(runs, tmp_path, capsys):
    run = runs("audio_mlp")  # full checkpoints; audio_mlp has no modules_to_save
    config = json.loads((run.out / "lora_adapters" / "adapter_config.json").read_text())
    config["modules_to_save"] = ["not_a_head"] if run.modules_to_save else HEADS
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(
        capsys, "extract", run.out / "checkpoint-2", "-o", tmp_path / "x", "--adapter-config", tmp_path
    )
    assert code == 1 and "modules_to_save" in err and "is it from another run?" in err, err
    assert not (tmp_path / "x").exists()


def test_extract_of_a_run_that_never_trained_warns(tmp_path, capsys):
    trainer = speech_trainer(
        make_speech_model(KINDS["heads"][0], None), tmp_path / "old", trainer_cls=PlainWrapperTrainer, max_steps=2,
        learning_rate=0.0,
    )  # fmt: skip
    trainer.train()
    code, _, err = run_cli(
        capsys, "extract", tmp_path / "old" / "checkpoint-2", "-o", tmp_path / "x", "--lora-alpha", "8"
    )
    assert code == 0 and "untrained" in err, err
    assert run_cli(capsys, "verify", tmp_path / "x")[0] == 1


def test_resume_from_an_adapter_only_checkpoint_that_lacks_a_head_names_it(tmp_path):
    """peft's own load raises a raw KeyError for the missing head; the resume names the checkpoint and the tensor."""
    targets, modules_to_save = KINDS["heads"]
    source = tmp_path / "adapter-only"
    speech_trainer(make_speech_model(targets, modules_to_save), source, adapter_only=True, max_steps=2).train()
    weights = source / "checkpoint-2" / "lora_adapters" / WEIGHTS
    tensors = load_file(str(weights))
    dropped = head_keys(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights))
    trainer = speech_trainer(make_speech_model(targets, modules_to_save), tmp_path / "resumed", adapter_only=True)
    with pytest.raises(AdapterVerificationError) as info:
        trainer.train(resume_from_checkpoint=str(source / "checkpoint-2"))
    message = str(info.value)
    assert str(source / "checkpoint-2") in message and dropped in message, message
    assert len(message.splitlines()) == 1
