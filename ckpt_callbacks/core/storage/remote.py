"""Checkpoints on any fsspec file system (`s3://`, `gs://`, `memory://`, ...).

Object stores have no atomic rename, so visibility comes from the manifest:
a checkpoint is staged in a local folder, every data file is uploaded, and
`manifest.json` is uploaded last. Readers (`list`, `latest`, `load`) trust only
checkpoints whose manifest exists and whose files match it, so an interrupted
upload is invisible. Deletion removes the manifest first for the same reason.

An upload first writes a marker object (`layout.UPLOAD_MARKER`) and removes it after
the manifest: a `checkpoint-{step}` prefix that holds the marker and no
manifest is an interrupted upload of this library, which the next writer
removes; any other prefix without a manifest is left alone.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec

from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest
from ckpt_callbacks.core.storage.durable import remove_tree_quietly
from ckpt_callbacks.core.storage.store import CheckpointStore
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointWriteError

__all__ = ["FsspecStore"]


class FsspecStore(CheckpointStore):
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, cache_dir: str | None = None) -> None:
        self.fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.base = path.rstrip("/")
        self.root = url.rstrip("/")
        self._cache_dir = cache_dir
        self._cache_folder: Path | None = None

    @property
    def _cache(self) -> Path:
        """A local folder of our own (even inside a cache_dir the user gives: everything in it is ours to
        replace), made when first needed: listing and reading manifests need none."""
        if self._cache_folder is None:
            self._cache_folder = Path(tempfile.mkdtemp(prefix="ckpt_callbacks-cache-", dir=self._cache_dir))
        return self._cache_folder

    def _remote(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    def list_names(self) -> list[str]:
        try:
            entries = self.fs.ls(self.base, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def read_manifest(self, name: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self._remote(name, layout.MANIFEST_NAME), start=0, end=MAX_MANIFEST_BYTES + 1))
        except FileNotFoundError:
            return None

    def size_problems(self, name: str, manifest: Manifest) -> list[CheckpointCorruptError]:
        try:
            found = self.fs.find(self._remote(name), detail=True, withdirs=False)
        except FileNotFoundError:
            found = {}
        prefix = self._remote(name) + "/"
        sizes = {str(path).removeprefix(prefix): int(info["size"]) for path, info in found.items()}
        problems = []
        for entry in manifest.files:
            size = sizes.get(entry.path)
            if size != entry.size:
                what = "missing" if size is None else f"size mismatch (expected {entry.size} bytes, found {size})"
                problems.append(CheckpointCorruptError(
                    f"{self.root}/{name}/{entry.path}: {what}. Re-save, or resume from an earlier checkpoint.",
                    path=f"{self.root}/{name}/{entry.path}", step=manifest.step,
                    reason="missing" if size is None else "size mismatch"))
        return problems

    def new_staging_dir(self, step: int) -> Path:
        staging = self._cache / layout.staging_name(step)
        staging.mkdir(parents=True)
        return staging

    def publish(self, staging_dir: Path, name: str) -> None:
        if self.read_manifest(name) is not None or self.fs.exists(self._remote(name, layout.UPLOAD_MARKER)):
            self.delete(name)  # re-saving a step (or an interrupted upload of it): retire the old one first, invisibly
        elif self.fs.exists(self._remote(name)):
            raise CheckpointWriteError(
                f"{self.root}/{name} exists and was not written by ckpt_callbacks (no {layout.MANIFEST_NAME}); it is "
                "left as it is and this checkpoint is not saved. Move it away, or give the run another output_dir.",
                path=f"{self.root}/{name}")
        files = sorted(p for p in staging_dir.rglob("*") if p.is_file() and p.name != layout.MANIFEST_NAME)
        try:
            self.fs.pipe_file(self._remote(name, layout.UPLOAD_MARKER), b"")
            for path in files:
                self.fs.put_file(str(path), self._remote(name, path.relative_to(staging_dir).as_posix()))
            # The manifest goes last: its arrival is the commit.
            self.fs.put_file(str(staging_dir / layout.MANIFEST_NAME), self._remote(name, layout.MANIFEST_NAME))
            self.fs.rm_file(self._remote(name, layout.UPLOAD_MARKER))
        except OSError as exc:
            raise CheckpointWriteError(
                f"Could not upload {name} to {self.root}: {exc}. The partial upload has no manifest, so it is "
                "invisible; it is removed by the next save. Earlier checkpoints are untouched.",
                path=f"{self.root}/{name}",
            ) from exc
        finally:
            remove_tree_quietly(staging_dir)
        self.fs.invalidate_cache(self.base)

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._remote(name, layout.MANIFEST_NAME))
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(self._remote(name), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.base)

    def local_dir(self, name: str) -> Path:
        """Download the checkpoint into the local cache (once) and return that folder."""
        local = self._cache / name
        manifest = self.read_manifest(name)
        cached = local / layout.MANIFEST_NAME
        if cached.is_file() and manifest is not None and cached.read_bytes() == manifest:
            return local
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        if manifest is None:
            return local
        # Exactly the files the manifest lists (its parser refuses paths that leave the folder), then the manifest.
        for entry in parse_manifest(manifest, source=f"{self.root}/{name}/{layout.MANIFEST_NAME}").files:
            target = local / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._remote(name, entry.path), str(target))
        cached.write_bytes(manifest)
        return local

    def clean_leftovers(self) -> list[str]:
        """Remove interrupted uploads of this library: `checkpoint-*` prefixes with the upload marker and no
        manifest (what the next upload of the same step would also replace)."""
        removed = []
        for name in self.list_names():
            if layout.parse_checkpoint_step(name) is None or self.read_manifest(name) is not None:
                continue
            if self.fs.exists(self._remote(name, layout.UPLOAD_MARKER)):
                self.fs.rm(self._remote(name), recursive=True)
                removed.append(name)
        cached = self._cache.iterdir() if self._cache_folder is not None else iter(())
        for leftover in (p for p in cached if layout.is_leftover(p.name)):
            remove_tree_quietly(leftover)
        return removed
