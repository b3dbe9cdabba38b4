"""Fill the shared weight cache once (``fetch``), or wait until it is filled (``wait``).

``QWEN3VL_WEIGHTS`` names the snapshots every pod serves: ``repo@commit`` entries separated by
whitespace, each commit a full 40-hex sha (ConfigMap ``qwen3vl-weights``, weights.yaml).

- ``fetch`` (the ``qwen3vl-weights`` Job, the only pod that downloads) downloads exactly those
  commits into ``HF_HOME``, points the cache's ``refs/main`` at each (offline loads by repo id
  then resolve to the pinned snapshot) and writes a completion marker per snapshot.
- ``wait`` (the serving pods' init container, ``HF_HUB_OFFLINE=1``) downloads nothing: it
  returns once every marker exists and ``refs/main`` names the pinned commit.

A name that is not a commit (``main``, a tag, the placeholder) is refused with exit code 2,
which the Job's podFailurePolicy turns into an immediate failure instead of retries.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

COMMIT = re.compile(r"[0-9a-f]{40}")
EXIT_UNPINNED = 2


def cache_root() -> Path:
    return Path(os.environ.get("HF_HOME", "/models"))


def pinned_snapshots() -> list[tuple[str, str]]:
    """(repo, commit) pairs from ``QWEN3VL_WEIGHTS``; exits 2 unless each is a full commit."""
    entries = os.environ.get("QWEN3VL_WEIGHTS", "").split()
    if not entries:
        _refuse("QWEN3VL_WEIGHTS is empty")
    pinned = []
    for entry in entries:
        repo, _, commit = entry.partition("@")
        if not COMMIT.fullmatch(commit):
            _refuse(f"{entry!r} does not pin a full 40-hex commit of {repo!r}")
        pinned.append((repo, commit))
    return pinned


def _refuse(reason: str) -> NoReturn:
    print(
        f"{reason}. Set the commit of each model in k8s/base/cache/weights.yaml (MODELS); "
        "a branch such as main would let pods load different snapshots.",
        file=sys.stderr,
    )
    sys.exit(EXIT_UNPINNED)


def _ref_main(repo: str) -> Path:
    return cache_root() / "hub" / f"models--{repo.replace('/', '--')}" / "refs" / "main"


def _marker(repo: str, commit: str) -> Path:
    return cache_root() / ".qwen3vl-weights" / f"{repo.replace('/', '--')}@{commit}"


def is_ready(repo: str, commit: str) -> bool:
    """The snapshot is complete and offline loads of ``repo`` resolve to it."""
    ref = _ref_main(repo)
    return _marker(repo, commit).exists() and ref.exists() and ref.read_text().strip() == commit


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(text)
    staged.replace(path)  # readers (other pods, over NFS) never see a half-written file


def fetch(download: Callable[..., str] | None = None) -> None:
    """Download each pinned snapshot (a no-op for those already complete)."""
    pinned = pinned_snapshots()  # refuse before importing or downloading anything
    if download is None:
        from huggingface_hub import snapshot_download  # reads HF_TOKEN (the optional Secret)

        download = snapshot_download
    for repo, commit in pinned:
        if is_ready(repo, commit):
            print(f"{repo}@{commit}: already cached", flush=True)
            continue
        print(f"{repo}@{commit}: downloading", flush=True)
        download(repo, revision=commit)
        _write_atomically(_ref_main(repo), commit)
        _write_atomically(_marker(repo, commit), f"{time.time():.0f}\n")
        print(f"{repo}@{commit}: complete", flush=True)


def wait(poll_s: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> None:
    """Return once every pinned snapshot is ready; never downloads."""
    pinned = pinned_snapshots()
    while missing := [f"{repo}@{commit}" for repo, commit in pinned if not is_ready(repo, commit)]:
        print(
            f"waiting for {' '.join(missing)} in {cache_root()}: the qwen3vl-weights Job fills it "
            "(kubectl logs job/qwen3vl-weights; after a revision change delete that Job and "
            "apply again)",
            flush=True,
        )
        sleep(poll_s)
    print("weights ready", flush=True)


if __name__ == "__main__":  # python3 weights.py fetch|wait
    {"fetch": fetch, "wait": wait}[sys.argv[1]]()
