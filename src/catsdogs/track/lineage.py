"""What produced a run: the data's identity and the code's git commit, as MLflow tags.

Stage-neutral facts read from the shards folder (:mod:`catsdogs.shards.manifest`) and the source tree.
"""

from __future__ import annotations

import subprocess  # nosec B404 # only runs git with a fixed argument list, never a shell
from pathlib import Path

from catsdogs import schema
from catsdogs.io.checksum import sha256_file
from catsdogs.shards.manifest import Manifest

TAG_PREFIX = "catsdogs."
"""Prefix of catsdogs' own MLflow tags (MLflow's are ``mlflow.``)."""
GIT_COMMIT_TAG = "mlflow.source.git.commit"
"""MLflow's tag for the code version (shown on the run's page)."""
GIT_TIMEOUT_S = 5.0
"""Seconds a ``git`` call may take (it answers in ~10 ms; a hung network filesystem must not stall)."""
SOURCE_ROOT = Path(__file__).resolve().parents[1]
"""The catsdogs package folder: its git checkout, if any, is the code that ran."""


def data_tags(source: str, root: str | Path, manifest: Manifest) -> dict[str, str]:
    """Return the data's identity: shards path, image folder, counts, files.csv sha256, schema version."""
    tags = {
        f"{TAG_PREFIX}data": source,
        f"{TAG_PREFIX}data.input": str(manifest.config.get("input", "")),
        f"{TAG_PREFIX}data.schema_version": str(manifest.schema_version),
        f"{TAG_PREFIX}data.format": manifest.format,
        f"{TAG_PREFIX}data.size": str(manifest.size),
        f"{TAG_PREFIX}data.resize": manifest.resize,
    }
    files_csv = Path(root) / schema.FILES_CSV_NAME
    tags[f"{TAG_PREFIX}data.files_csv_sha256"] = sha256_file(files_csv) if files_csv.is_file() else "absent"
    for split, per_class in manifest.counts.items():
        tags[f"{TAG_PREFIX}data.count.{split}"] = str(sum(per_class.values()))
        for name, n in per_class.items():
            tags[f"{TAG_PREFIX}data.count.{split}.{name}"] = str(n)
    return tags


def git_tags() -> dict[str, str]:
    """Return MLflow's git commit tag plus whether tracked files differ from it ({} outside a checkout)."""
    def git(*args: str) -> str:
        # B603/B607: a fixed argument list (no shell, no user input), git found on PATH like any git client.
        out = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True,  # nosec B603 B607
                             timeout=GIT_TIMEOUT_S, check=True)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {GIT_COMMIT_TAG: commit, f"{TAG_PREFIX}git.dirty": str(dirty).lower()}
