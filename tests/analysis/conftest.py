"""A tiny byte-level BPE tokenizer, a tiny random Llama over its vocabulary, and a random Lorsa for layer 1."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests.conftest import make_base, make_lorsa

WORDS = "the cat sat on a mat and then it ran to one two three four five six seven eight nine ten".split()


def sample_texts(n: int = 40) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12 + i % 9)) + "." for i in range(n)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(sample_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def make_model(tokenizer):
    return make_base("llama", vocab_size=len(tokenizer), max_position_embeddings=256)


def make_layer1_lorsa(model):
    return make_lorsa(model.config, layers=[1], n_ov_heads=32, top_k=4)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return sample_texts()


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture
def lorsa(model):
    return make_layer1_lorsa(model)
