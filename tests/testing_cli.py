"""Running the `higgs-trainer` command in-process, and damaging adapters, for the CLI tests."""

import json
import pathlib

from safetensors.torch import load_file, save_file

from higgs_trainer import find_lora_model
from higgs_trainer.cli import main
from higgs_trainer.training.saving import clone_shared_tensors, write_lora_adapters
from tests.testing_models import make_model, tiny_base_model, trained_like


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of `higgs-trainer ARGV` (what was printed before it is dropped)."""
    capsys.readouterr()  # e.g. transformers 5's "Writing model shards" bar while a test saved its inputs
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, text):
    """stderr is one line, holds `text`, and shows no traceback."""
    assert text in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def rename_lora_modules(adapter, old, new):
    """Rename a target module in an adapter's tensors and config alike: a sound adapter for another model."""
    adapter = pathlib.Path(adapter)
    weights = str(adapter / "adapter_model.safetensors")
    save_file({k.replace(old, new): v for k, v in load_file(weights).items()}, weights)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = [new if t == old else t for t in config["target_modules"]]
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def write_cli_inputs(root: pathlib.Path) -> pathlib.Path:
    """Into ``root``: a base (``base/``), a trained-looking adapter (``lora_adapters/``) and a full checkpoint
    written without an adapter (``checkpoint-2/model.safetensors``), what the commands take."""
    tiny_base_model().save_pretrained(str(root / "base"))
    model = trained_like(make_model())
    write_lora_adapters(find_lora_model(model), root)
    (root / "checkpoint-2").mkdir()
    state = {k: v.contiguous() for k, v in clone_shared_tensors(model.state_dict()).items()}
    save_file(state, str(root / "checkpoint-2" / "model.safetensors"))
    return root
