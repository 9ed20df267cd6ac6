"""Shared fixtures: tiny models built from configs (for the math) and the embedded model (end to end)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from eigenshift_core.loading import LoadedModel, load_model, prepare_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RTP_CSV = SHARED_DATA / "rtp_toxic_prompts_5000.csv"
REFERENCE_CSV = SHARED_DATA / "llama2_7b_rtp_toxic_words.csv"
WIKITEXT = SHARED_DATA / "wikitext2_test.raw"
BYTE_VOCAB = 256 + 2  # byte-level tokens plus <eos> and <pad>


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real, lossless byte-level tokenizer with no merges: 258 ids, offsets and decoding work."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"], vocab["<pad>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    return prepare_tokenizer(fast)


def _tiny(model: torch.nn.Module, name: str) -> LoadedModel:
    torch.manual_seed(0)
    model.eval()
    return LoadedModel(model=model, tokenizer=byte_tokenizer(), model_id=name, revision=None)


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=256, pad_token_id=257, bos_token_id=None,
    )
    return _tiny(LlamaForCausalLM(config), "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2() -> LoadedModel:
    """Tied input embeddings and lm_head, absolute positions: the cases where mistakes show."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=BYTE_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
        tie_word_embeddings=True, eos_token_id=256, pad_token_id=257, bos_token_id=256,
    )
    return _tiny(GPT2LMHeadModel(config), "tiny-gpt2")


@pytest.fixture(scope="session", params=["tiny_llama", "tiny_gpt2"])
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    return load_model("embedded", device="cpu")
