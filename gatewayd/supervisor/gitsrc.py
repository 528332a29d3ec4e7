"""The controller's local git repository as an update source (the seed gateway's way).

Versions are resolved with `git rev-parse <version>^{commit}`, so a tag, a branch, a full
or an abbreviated commit hash all name the same commit, and two names of one commit are
recognised as the same version. The build context is `git archive` of that commit: the
operator's working tree is never checked out or modified.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import IO


class GitError(Exception):
    pass


_BAD = re.compile(r"[\s~^:?*\[\\]|\.\.|@\{")


def check_version_name(version: str) -> None:
    """Refuse what is not a plain ref name or hash (and anything git would read as an option)."""
    if not version or version.startswith("-") or _BAD.search(version) or len(version) > 200:
        raise GitError(f"{version!r} is not a valid git tag, branch or commit name")


def _git(repo: Path, *args: str, timeout: float = 60.0, stdout: IO[bytes] | None = None) -> str:
    argv = ["git", "-c", f"safe.directory={repo}", "-C", str(repo), *args]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=stdout or subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise GitError("git is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise GitError(f"git {args[0]} timed out after {timeout:.0f} s") from e
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitError(f"git {' '.join(args[:2])} failed: {err[-1] if err else f'exit {proc.returncode}'}")
    return proc.stdout.decode("utf-8", "replace").strip() if stdout is None else ""


def rev_parse(repo: Path, version: str) -> str | None:
    """The full commit hash `version` names, or None."""
    check_version_name(version)
    try:
        out = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{version}^{{commit}}")
    except GitError:
        return None
    return out or None


def has_remote(repo: Path) -> bool:
    try:
        return bool(_git(repo, "remote"))
    except GitError:
        return False


def resolve(repo: Path, version: str, fetch: bool = True) -> str:
    """The commit of `version`, fetching tags from the remotes when it is not known locally."""
    if not (repo / ".git").exists() and not (repo / "HEAD").exists():
        raise GitError(f"{repo} is not a git repository")
    commit = rev_parse(repo, version)
    if commit is None and fetch and has_remote(repo):
        _git(repo, "fetch", "--tags", "--quiet", timeout=300.0)
        commit = rev_parse(repo, version)
    if commit is None:
        raise GitError(f"version {version!r} is not a tag or commit of {repo}")
    return commit


def describe(repo: Path, commit: str) -> str:
    """A tag pointing at the commit, else its abbreviated hash."""
    try:
        tags = _git(repo, "tag", "--points-at", commit).split()
    except GitError:
        tags = []
    return sorted(tags)[0] if tags else commit[:12]


def archive(repo: Path, commit: str, out: IO[bytes]) -> None:
    """Write a tar of the commit's tree to `out` (the docker build context)."""
    _git(repo, "archive", "--format=tar", commit, timeout=600.0, stdout=out)
