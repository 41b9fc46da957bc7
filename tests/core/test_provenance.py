"""The manifest's git commit is read from the repository's files, as `git rev-parse HEAD` reports it, without
starting a process (a `git` child started on the provenance thread hung a training whose DataLoader workers were
forking at the same instant)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ckpt_callbacks.core.format.provenance import git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command to build repositories")


def git(folder: Path, *args: str) -> str:
    identity = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(folder), "PATH": "/usr/bin:/bin:/usr/local/bin"}
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True,
                          env=identity).stdout.strip()


def forbid_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("git_commit started a process")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.delenv("GIT_DIR", raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    folder = tmp_path / "repo"
    folder.mkdir()
    git(folder, "init", "-q")
    git(folder, "commit", "-q", "--allow-empty", "-m", "one")
    git(folder, "commit", "-q", "--allow-empty", "-m", "two")
    (folder / "sub" / "deeper").mkdir(parents=True)
    return folder


def test_the_branch_commit_is_read_in_the_work_tree_and_below_it(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = git(repo, "rev-parse", "HEAD")
    forbid_processes(monkeypatch)
    assert git_commit(str(repo)) == expected
    assert git_commit(str(repo / "sub" / "deeper")) == expected


def test_packed_refs_a_detached_head_and_a_linked_work_tree(repo: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    first, branch = git(repo, "rev-parse", "HEAD~1"), git(repo, "symbolic-ref", "HEAD")
    git(repo, "pack-refs", "--all")
    assert not (repo / ".git" / branch).exists()  # the branch is only in packed-refs now
    newest = git(repo, "rev-parse", "HEAD")
    git(repo, "worktree", "add", "-q", "--detach", str(tmp_path / "linked"), first)
    git(tmp_path / "linked", "checkout", "-q", "-b", "side")
    (tmp_path / "other").mkdir()
    git(repo, "worktree", "add", "-q", "--detach", str(tmp_path / "other" / "detached"), first)
    forbid_processes(monkeypatch)
    assert git_commit(str(repo)) == newest
    assert git_commit(str(tmp_path / "linked")) == first  # its branch's loose ref in the main repository
    assert git_commit(str(tmp_path / "other" / "detached")) == first


def test_outside_a_repository_or_before_the_first_commit_there_is_none(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    forbid_processes(monkeypatch)
    assert git_commit(str(tmp_path)) is None
    assert git_commit(str(empty)) is None  # HEAD names a branch with no commit yet
