"""Resolve ``hf://owner/repo[@revision]/path/in/repo`` references to local files.

A reference is looked up first in a local models folder (``$CAUSVID_MODELS_DIR``, default
``~/.cache/comfyui-causvid/models``; the file ``<dir>/<owner>/<repo>/<path>``), then through
``huggingface_hub.hf_hub_download`` (its cache). Offline, the error says which file to get from
where and the exact path to put it at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HF_SCHEME = "hf://"


class HubDownloadError(FileNotFoundError):
    """A Hugging Face file could not be found locally nor downloaded."""


@dataclass(frozen=True)
class HubRef:
    """One file of a Hugging Face model repository."""

    repo_id: str  # "owner/name"
    path: str  # path inside the repo, e.g. "autoregressive_checkpoint/model.pt"
    revision: str | None = None

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def subfolder(self) -> str | None:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else None

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/blob/{self.revision or 'main'}/{self.path}"


def is_hub_ref(source: str | Path) -> bool:
    """True for ``hf://...`` strings."""
    return isinstance(source, str) and source.startswith(HF_SCHEME)


def parse_hub_ref(source: str) -> HubRef:
    """Split ``hf://owner/repo[@rev]/path/to/file`` into repo id, path and revision."""
    parts = source[len(HF_SCHEME) :].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(
            f"bad Hugging Face reference {source!r}: expected hf://owner/repo/path/to/file, "
            "e.g. hf://tianweiy/CausVid/autoregressive_checkpoint/model.pt"
        )
    name, _, revision = parts[1].partition("@")
    return HubRef(f"{parts[0]}/{name}", "/".join(parts[2:]), revision or None)


def models_dir() -> Path:
    """Folder searched for hand-downloaded Hub files (``$CAUSVID_MODELS_DIR``)."""
    env = os.environ.get("CAUSVID_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("CAUSVID_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "comfyui-causvid"
    return base / "models"


def local_path(ref: HubRef) -> Path:
    """Where a hand-downloaded copy of ``ref`` is looked for."""
    return models_dir() / ref.repo_id / ref.path


def _offline_message(ref: HubRef, err: BaseException) -> str:
    target = local_path(ref)
    return (
        f"could not get {ref.path!r} from the Hugging Face repo {ref.repo_id!r} "
        f"({type(err).__name__}: {err}). Download it from {ref.url} and put it at {target} "
        f"(for example: huggingface-cli download {ref.repo_id} {ref.path} "
        f"--local-dir {models_dir() / ref.repo_id}), or pass the local file path instead."
    )


def resolve_hub_ref(source: str) -> Path:
    """Local path of a ``hf://`` file: the local models folder, else the Hub cache (downloading)."""
    ref = parse_hub_ref(source)
    hand_copy = local_path(ref)
    if hand_copy.is_file():
        return hand_copy
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise HubDownloadError(_offline_message(ref, err) + " (huggingface_hub is not installed)") from err
    try:
        path = hf_hub_download(
            repo_id=ref.repo_id, filename=ref.filename, subfolder=ref.subfolder, revision=ref.revision
        )
    except Exception as err:  # every hub failure (offline, missing entry, HTTP) gets the same advice
        raise HubDownloadError(_offline_message(ref, err)) from err
    return Path(path)


def resolve_source(source: str | Path) -> Path:
    """A local path for ``source`` (a path, or a ``hf://`` reference)."""
    if is_hub_ref(source):
        return resolve_hub_ref(str(source))
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path
