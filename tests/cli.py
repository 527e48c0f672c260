"""Running the `higgs-trainer` command in-process, and damaging adapters, for the CLI tests."""

import json
import pathlib

from safetensors.torch import load_file, save_file

from higgs_trainer.cli import main


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
