"""The Hub's HTTP API replaced at the `huggingface_hub` client boundary: `HfApi.create_repo`, `create_branch` and
`create_commit` record what they are sent instead of sending it. Nothing of lorsa_hf is replaced."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest


class RecordingHub:
    """Records the repositories created, the branches and the files of each commit."""

    def __init__(self) -> None:
        self.repos: list[str] = []
        self.repo_options: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        self.repo_options.append(kwargs)
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, branch, **kwargs):
        self.branches.append((repo_id, branch))

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/{len(self.commits)}", oid="0" * 40)


def record_hub_calls(monkeypatch: pytest.MonkeyPatch) -> RecordingHub:
    """Route `HfApi.create_repo`, `create_branch` and `create_commit` to a new recorder and return it."""
    recorder = RecordingHub()
    for name in ("create_repo", "create_branch", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, _client_method(getattr(recorder, name)))
    return recorder


def _client_method(record):
    """An `HfApi` method that hands its arguments to `record` instead of the Hub."""

    def method(api, *args, **kwargs):
        return record(*args, **kwargs)

    return method


def write_hub_cache(
    cache_dir: Path, repo_id: str, files: dict[str, bytes], revision: str = "main", commit: str = "a" * 40
) -> Path:
    """Lay `files` (path in repo -> content) out as the Hub cache holds a downloaded repo: the file under
    `snapshots/<commit>/`, and `refs/<revision>` naming the commit; return the snapshot folder."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path, content in files.items():
        (snapshot / path).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / path).write_bytes(content)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
