"""The version shims in higgs_trainer._compat, on the stack where each is needed."""

import pickle
import random

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import Trainer

from higgs_trainer import HiggsLoraTrainer
from tests.testing_models import RandomTokens, make_model, training_args

OLD_TRANSFORMERS = Version(transformers.__version__) < Version("4.47")


def test_rng_state_of_a_checkpoint_loads_and_restores_python_random(tmp_path):
    trainer = HiggsLoraTrainer(
        model=make_model(), args=training_args(tmp_path, max_steps=2), train_dataset=RandomTokens()
    )
    trainer.train()
    checkpoint = str(tmp_path / "checkpoint-2")
    expected = torch.load(f"{checkpoint}/rng_state.pth", weights_only=False)["python"]
    random.seed(12345)
    trainer._load_rng_state(checkpoint)
    assert random.getstate() == expected


@pytest.mark.skipif(not OLD_TRANSFORMERS, reason="transformers >= 4.47 allow-lists the RNG globals itself")
def test_plain_trainer_on_446_cannot_load_rng_state_which_is_why_the_shim_exists(tmp_path):
    # transformers issue 34631: torch >= 2.6 loads with weights_only=True and refuses numpy's RNG state.
    trainer = HiggsLoraTrainer(
        model=make_model(), args=training_args(tmp_path, max_steps=2), train_dataset=RandomTokens()
    )
    trainer.train()
    with pytest.raises(pickle.UnpicklingError):
        Trainer._load_rng_state(trainer, str(tmp_path / "checkpoint-2"))
