"""Tiny real parts for speech on the Higgs stack: boson's HiggsAudioModel with audio output (delay pattern on, as in
Higgs Audio v2), a character-level text tokenizer with boson's special tokens, and boson's HiggsAudioTokenizer built
from a config (a tiny random HuBERT as its semantic teacher, random codebooks). Random weights, nothing downloaded.

Import only on the Higgs stack (boson_multimodal is imported here).
"""

from __future__ import annotations

import string

import torch
import transformers
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from higgs_trainer.speech.boson_backend import BosonSpeechBackend, audio_tokenizer_from_config
from tests.testing_models import VOCAB

CODEBOOKS, CODES = 4, 32  # the codec's and the model's: 4 codebooks of 32 codes (+ stream BOS 32, EOS 33)
SAMPLE_RATE, RATIOS = 16000, [4, 4, 4, 5]  # 50 frames a second, as boson's 16 kHz configs
# HiggsAudioTokenizer's keywords, as in its config.json
AUDIO_TOKENIZER_CONFIG = dict(
    D=8, ratios=RATIOS, sample_rate=SAMPLE_RATE, bins=CODES, n_q=CODEBOOKS, codebook_dim=8,
    semantic_techer="hubert_base", semantic_sample_rate=16000,
)  # fmt: skip
SPECIAL_IDS = {
    "<|pad|>": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2, "[UNK]": 3, "<|start_header_id|>": 240,
    "<|end_header_id|>": 241, "<|eot_id|>": 242, "<|eom_id|>": 243, "<|recipient|>": 244, "<|scene_desc_start|>": 245,
    "<|scene_desc_end|>": 246, "<|audio_bos|>": 249, "<|AUDIO|>": 250, "<|AUDIO_OUT|>": 251,
    "<|audio_out_bos|>": 252, "<|audio_eos|>": 253,
}  # fmt: skip


def tiny_text_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per printable character, and boson's special tokens at the ids the tiny model's config names."""
    characters = string.printable[:-3]  # letters, digits, punctuation, space, tab, newline
    vocabulary = {character: 4 + i for i, character in enumerate(characters)} | SPECIAL_IDS
    unused = sorted(set(range(max(SPECIAL_IDS.values()) + 1)) - set(vocabulary.values()))
    vocabulary |= {f"<|reserved_{i}|>": i for i in unused}  # no holes in the ids
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.add_special_tokens([token for token in SPECIAL_IDS if token != "[UNK]"])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|pad|>",
        unk_token="[UNK]",
    )  # fmt: skip


def tiny_speech_model(seed: int = 0) -> HiggsAudioModel:
    """A tiny boson HiggsAudioModel that speaks: DualFFN layers, delay pattern, audio-in codes, no Whisper tower.

    Its stream-EOS logits are 0 (the rest random), so greedy generation speaks until the length limit; the tests
    force an early end through a logits processor.
    """
    torch.manual_seed(seed)
    config = HiggsAudioConfig(
        text_config=dict(
            model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
        ),
        audio_adapter_type="dual_ffn", audio_dual_ffn_layers=[0, 1], audio_ffn_hidden_size=64,
        audio_ffn_intermediate_size=128, skip_audio_tower=True, encode_whisper_embed=False, encode_audio_in_tokens=True,
        use_delay_pattern=True, audio_num_codebooks=CODEBOOKS, audio_codebook_size=CODES, audio_stream_bos_id=CODES,
        audio_stream_eos_id=CODES + 1, audio_in_token_idx=SPECIAL_IDS["<|AUDIO|>"],
        audio_out_token_idx=SPECIAL_IDS["<|AUDIO_OUT|>"], audio_out_bos_token_id=SPECIAL_IDS["<|audio_out_bos|>"],
        audio_eos_token_id=SPECIAL_IDS["<|audio_eos|>"], pad_token_id=0,
    )  # fmt: skip
    model = HiggsAudioModel(config).eval()
    with torch.no_grad():  # untrained, it would stop at random: its stream-EOS logits are 0, below the best code's
        model.audio_decoder_proj.audio_lm_head.weight.view(CODEBOOKS, CODES + 2, -1)[:, CODES + 1] = 0.0
    return model


def tiny_audio_tokenizer(seed: int = 0) -> torch.nn.Module:
    """boson's HiggsAudioTokenizer, tiny and random: RVQ of 4 x 32 codes, a one-layer random HuBERT as the teacher.

    The teacher's hidden size is boson's fixed 768; its strides (5*4*4*4 = 320) match the codec's hop, as HuBERT's do.
    The codebooks are random and marked initialised, as after boson's loader reads a trained ``model.pth`` (otherwise
    they start at zero and wait for k-means on the first training batch).
    """
    torch.manual_seed(seed)
    teacher = transformers.HubertModel(
        transformers.HubertConfig(
            hidden_size=768, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(16,) * 4,
            conv_kernel=(10, 4, 4, 4), conv_stride=(5, 4, 4, 4), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        )
    )  # fmt: skip
    tokenizer = audio_tokenizer_from_config(AUDIO_TOKENIZER_CONFIG, teacher)
    with torch.no_grad():
        for layer in tokenizer.quantizer.vq.layers:
            layer._codebook.embed.normal_()
            layer._codebook.embed_avg.copy_(layer._codebook.embed)
            layer._codebook.inited.fill_(1)
    return tokenizer


def tiny_backend() -> BosonSpeechBackend:
    return BosonSpeechBackend(tiny_text_tokenizer(), tiny_audio_tokenizer())
