"""A tiny random Llama / GPT-NeoX with a real (tiny, byte-level BPE) tokenizer, saved to disk, and a text file:
everything `lorsa-hf train` needs, without the Hub."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

WORDS = (
    "the a cat dog sat on mat and ran to house tree bird sang in morning evening red blue green small big old "
    "young king queen said that it was not very good day night river stone road far near after before when"
).split()


def make_text(lines: int, seed: int) -> list[str]:
    """Sentences of random words with a little structure (repeated names), one document per line."""
    rng = random.Random(seed)
    texts = []
    for _ in range(lines):
        name = rng.choice(["Alice", "Bob", "Carol", "Dave"])
        words = [rng.choice(WORDS) for _ in range(rng.randint(12, 40))]
        texts.append(f"{name} " + " ".join(words) + f" and {name} left.")
    return texts


def make_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(make_text(200, seed=123), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, layers: int = 3):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=128, initializer_range=0.2, bos_token_id=0, eos_token_id=1,
        pad_token_id=2,
    )
    if arch == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(rotary_pct=0.5, attention_bias=True, **common)).eval()
    extra = {"head_dim": 8} if arch == "qwen3" else {}  # Qwen3Config's default head_dim is 128, not d / heads
    model = GQA_CLASSES[arch][1](GQA_CLASSES[arch][0](num_key_value_heads=2, **extra, **common)).eval()
    with torch.no_grad():  # the q/k/v biases of Qwen2 and the q/k norm gains of Qwen3 away from their init
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                parameter.normal_(0.0, 0.3)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.uniform_(0.5, 1.5)
    return model


GQA_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
ARCHITECTURES = ("llama", "gpt_neox", "qwen3", "qwen2", "mistral")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """On disk: a tiny Llama and GPT-NeoX (with the tokenizer) and train/held-out text files."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for arch in ARCHITECTURES:
        folder = root / arch
        make_model(arch, tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        paths[arch] = folder
    for name, lines, seed in (("train", 600, 1), ("heldout", 60, 2)):
        path = root / f"{name}.txt"
        path.write_text("\n".join(make_text(lines, seed)) + "\n")
        paths[name] = path
    return paths


def tiny_recipe_dict(files: dict[str, Path], output_dir: Path, arch: str = "llama", **sections) -> dict:
    """A recipe for the tiny model: 2 layers, 64 heads in 4 groups, K 4 (annealed from 16)."""
    values = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "model": {"name": str(files[arch])},
        "data": {
            "source": "files", "files": [str(files["train"])], "heldout_files": [str(files["heldout"])],
            "context_length": 32, "batch_size": 8,
        },
        "lorsa": {"layers": [0, 1], "n_ov_heads": 64, "n_qk_heads": 4, "top_k": 4},
        "init": {},
        "training": {
            "max_steps": 30, "lr": 3e-3, "k_initial": 16, "k_anneal_fraction": 0.2, "warmup_fraction": 0.05,
            "eval_every": 1000, "eval_sequences": 16, "checkpoint_every": 1000, "log_every": 5,
            "clip_grad_norm": 1.0, "progress_bar": False,
        },
    }
    for section, overrides in sections.items():
        if isinstance(values.get(section), dict):
            values[section].update(overrides)
        else:
            values[section] = overrides
    return values
