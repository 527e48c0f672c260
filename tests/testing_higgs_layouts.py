"""Both Higgs Audio v2 layouts, for the convert tests: fixtures made on one stack, checked on the other.

Run as ``python -m tests.testing_higgs_layouts COMMAND DIR`` with either stack's python:

- ``make-boson DIR`` (Higgs stack): a tiny boson ``HiggsAudioModel`` trained a few steps with LoRA on
  attention and ``audio_mlp`` plus ``modules_to_save`` (``audio_decoder_proj.audio_lm_head``); writes
  DIR/base, DIR/adapter, DIR/inputs.safetensors and the reference text and audio logits.
- ``make-transformers DIR`` (newest stack): the same with a tiny ``HiggsAudioV2ForConditionalGeneration``.
- ``check-transformers DIR`` / ``check-boson DIR``: convert DIR's base and adapter into that stack's
  layout with ``higgs_trainer.convert``, load them with ``PeftModel.from_pretrained`` and compare
  the logits on the same inputs with the reference (and with the base alone: the adapter must matter).

Inputs are given in the transformers form (one ``<|AUDIO_OUT|>`` token per audio frame); the boson
model gets the same sequence as one placeholder plus ``audio_out_ids``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from higgs_trainer import convert_layout as convert

VOCAB, HIDDEN, LAYERS, CODEBOOKS, CODEBOOK = 256, 64, 2, 4, 32  # CODEBOOK: without the two stream tokens
AUDIO_OUT, AUDIO_OUT_BOS, AUDIO_EOS, DELAY = 251, 252, 253, 254
STREAM_BOS, STREAM_EOS = CODEBOOK, CODEBOOK + 1
FRAMES = 9
TEXT = [11, 12, 13, 14, AUDIO_OUT_BOS, AUDIO_OUT, AUDIO_EOS, 15]  # 8 tokens; 7 + 9 frames = 16 (a multiple of 8)
ATTENTION_AND_AUDIO_MLP = ["q_proj", "v_proj", "audio_mlp.gate_proj", "audio_mlp.up_proj", "audio_mlp.down_proj"]
SAVED_HEAD = {"boson": "audio_decoder_proj.audio_lm_head", "transformers": "audio_lm_head"}
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def tiny_boson(seed: int = 0):
    """A tiny boson HiggsAudioModel: DualFFN on every layer, no audio tower (Higgs stack only)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel

    torch.manual_seed(seed)
    config = HiggsAudioConfig(
        text_config=dict(
            model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
        ),
        audio_adapter_type="dual_ffn", audio_dual_ffn_layers=list(range(LAYERS)), audio_ffn_hidden_size=HIDDEN,
        audio_ffn_intermediate_size=128, skip_audio_tower=True, audio_num_codebooks=CODEBOOKS,
        audio_codebook_size=CODEBOOK, audio_stream_bos_id=STREAM_BOS, audio_stream_eos_id=STREAM_EOS,
        audio_in_token_idx=250, audio_out_token_idx=AUDIO_OUT, audio_out_bos_token_id=AUDIO_OUT_BOS,
        audio_eos_token_id=AUDIO_EOS, pad_token_id=0, use_cache=False,
    )  # fmt: skip
    return HiggsAudioModel(config)


def tiny_v2_config():
    """The transformers config of the same tiny model (newest stack)."""
    from transformers import HiggsAudioV2Config

    return HiggsAudioV2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=HIDDEN // 4, max_position_embeddings=128, num_codebooks=CODEBOOKS,
        codebook_size=CODEBOOK + 2, audio_stream_bos_id=STREAM_BOS, audio_stream_eos_id=STREAM_EOS,
        audio_token_id=AUDIO_OUT, audio_bos_token_id=AUDIO_OUT_BOS, audio_delay_token_id=DELAY, pad_token_id=0,
        bos_token_id=1, eos_token_id=AUDIO_EOS, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip


def tiny_v2(seed: int = 0):
    """A tiny random HiggsAudioV2ForConditionalGeneration with its text head (newest stack)."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    torch.manual_seed(seed)
    return HiggsAudioV2ForConditionalGeneration(tiny_v2_config(), use_text_head=True)


def transformers_inputs() -> dict[str, torch.Tensor]:
    """One sequence: text, then FRAMES audio frames (stream bos ... stream eos), then text."""
    codes = torch.randint(0, CODEBOOK, (FRAMES, CODEBOOKS), generator=torch.Generator().manual_seed(5))
    codes[0], codes[-1] = STREAM_BOS, STREAM_EOS
    at = TEXT.index(AUDIO_OUT)
    ids = torch.tensor(TEXT[:at] + [AUDIO_OUT] * FRAMES + TEXT[at + 1 :])[None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "audio_input_ids": codes[None],
        "audio_input_ids_mask": torch.ones(1, FRAMES, dtype=torch.bool),
    }


def boson_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same sequence for HiggsAudioModel: one placeholder token, the codes as audio_out_ids."""
    ids = torch.tensor(TEXT)[None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "audio_out_ids": inputs["audio_input_ids"][0].T.contiguous(),
        "audio_out_ids_start": torch.tensor([0]),
        "use_cache": False,
    }


def logits(model, inputs: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Text logits at every position and audio logits (frames, codebooks, codebook + 2) at the audio frames."""
    model.eval()
    with torch.no_grad():
        if layout == "boson":
            out = model(**boson_inputs(inputs))
            return {"text": out.logits[0].float(), "audio": out.audio_logits.float()}
        inner = model.get_base_model() if isinstance(model, PeftModel) else model
        out = model(**inputs)
        hidden = inner.model(**{k: v for k, v in inputs.items()}).last_hidden_state
        mask = inputs["input_ids"][0] == AUDIO_OUT
        audio = out.logits[0][mask].reshape(FRAMES, CODEBOOKS, CODEBOOK + 2)
        return {"text": inner.text_lm_head(hidden)[0].float(), "audio": audio.float()}


def _loss(model, inputs, layout) -> torch.Tensor:
    out = logits_with_grad(model, inputs, layout)
    ids = inputs["input_ids"][0]
    text = torch.nn.functional.cross_entropy(out["text"][:-1], ids[1:])
    audio = torch.nn.functional.cross_entropy(
        out["audio"].reshape(-1, CODEBOOK + 2), inputs["audio_input_ids"][0].reshape(-1)
    )
    return text + audio


def logits_with_grad(model, inputs, layout):
    model.train()
    if layout == "boson":
        out = model(**boson_inputs(inputs))
        return {"text": out.logits[0], "audio": out.audio_logits}
    inner = model.get_base_model()
    hidden = inner.model(**inputs).last_hidden_state
    mask = inputs["input_ids"][0] == AUDIO_OUT
    return {
        "text": inner.text_lm_head(hidden)[0],
        "audio": inner.audio_lm_head(hidden)[0][mask].reshape(FRAMES, CODEBOOKS, CODEBOOK + 2),
    }


def make(directory: str | Path, layout: str) -> None:
    """Base, LoRA-trained adapter, inputs and reference logits of a tiny model in ``layout``, under ``directory``."""
    directory = Path(directory)
    base = tiny_boson() if layout == "boson" else tiny_v2()
    base.save_pretrained(directory / "base", safe_serialization=True)
    inputs = transformers_inputs()
    base_logits = logits(base, inputs, layout)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=ATTENTION_AND_AUDIO_MLP,
        modules_to_save=[SAVED_HEAD[layout]],
    )
    model = get_peft_model(base, config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    for _ in range(3):
        optimizer.zero_grad()
        _loss(model, inputs, layout).backward()
        optimizer.step()
    model.save_pretrained(directory / "adapter")
    reference = logits(model, inputs, layout)
    save_file(inputs, str(directory / "inputs.safetensors"))
    save_file({f"{k}": v.contiguous() for k, v in reference.items()}, str(directory / "reference.safetensors"))
    save_file({f"{k}": v.contiguous() for k, v in base_logits.items()}, str(directory / "base_logits.safetensors"))
    (directory / "layout.json").write_text(json.dumps({"layout": layout}))


def load(directory: str | Path, layout: str, adapter: str | Path):
    """Base model and adapter in ``layout`` from ``directory``, the way a user loads them."""
    if layout == "boson":
        from boson_multimodal.model.higgs_audio import HiggsAudioModel

        base = HiggsAudioModel.from_pretrained(str(directory))
    else:
        from transformers import HiggsAudioV2ForConditionalGeneration

        base = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(directory), use_text_head=True)
    return PeftModel.from_pretrained(base, str(adapter))


def check(directory: str | Path, layout: str) -> dict[str, float]:
    """Convert ``directory``'s fixture to ``layout``, load it, compare logits; returns the largest differences."""
    directory = Path(directory)
    source = json.loads((directory / "layout.json").read_text())["layout"]
    assert source != layout, "the fixture is already in this layout"
    convert(directory / "base", layout, directory / f"base-{layout}")
    result = convert(directory / "adapter", layout, directory / f"adapter-{layout}", base=directory / f"base-{layout}")
    assert result.verified_on_base
    model = load(directory / f"base-{layout}", layout, directory / f"adapter-{layout}")
    inputs = load_file(str(directory / "inputs.safetensors"))
    reference = load_file(str(directory / "reference.safetensors"))
    base_logits = load_file(str(directory / "base_logits.safetensors"))
    got = logits(model, inputs, layout)
    differences = {}
    for name in ("text", "audio"):
        torch.testing.assert_close(got[name], reference[name], **TOLERANCE, msg=f"{name} logits")
        differences[name] = float((got[name] - reference[name]).abs().max())
        # the adapter (and the saved head) must matter, or this comparison proves nothing
        assert (reference[name] - base_logits[name]).abs().max() > 1e-2, (
            f"the adapter does not change the {name} logits"
        )
    return differences


def main(argv: list[str]) -> int:
    command, directory = argv
    if command.startswith("make-"):
        make(directory, command[len("make-") :])
    else:
        sys.stdout.write(json.dumps(check(directory, command[len("check-") :])) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
