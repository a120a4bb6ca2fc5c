"""Atomic training checkpoints on top of ``accelerator.save_state``.

Layout under the run's ``checkpoints/`` folder::

    checkpoint-500/        a complete checkpoint (accelerate state + our trainable weights + checkpoint.json)
    checkpoint-1000/
    latest                 text file naming the newest complete checkpoint ("checkpoint-1000")

A checkpoint is written into ``.tmp-checkpoint-N`` by every process, flushed to disk (fsync of every file and
folder), then renamed to ``checkpoint-N`` in one ``os.replace``, after which ``latest`` is rewritten the same way
(temporary file, fsync, rename). A crash at any moment therefore leaves ``latest`` naming a complete checkpoint;
left-over temporary folders are removed by the next run. ``checkpoint.json`` (written last, before the rename)
lists every file with its size, so a checkpoint damaged afterwards is detected when resuming.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

__all__ = [
    "LATEST",
    "MANIFEST",
    "complete_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "remove_partial",
    "resolve_resume",
    "save_checkpoint",
    "verify_checkpoint",
    "write_text_atomic",
]

LATEST = "latest"
MANIFEST = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temporary file in the same folder, fsync, rename, fsync folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _write_manifest(folder: Path, step: int, extra: dict | None) -> None:
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"step": step, "files": files, **(extra or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify_checkpoint(folder: Path) -> dict:
    """Check a checkpoint folder against its manifest; returns it or raises ValueError naming what is wrong."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(
            f"{folder} is not a complete checkpoint (no {MANIFEST}; was it written by an interrupted run?)."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path} is damaged: {err}") from None
    for rel, size in manifest.get("files", {}).items():
        p = folder / rel
        if not p.is_file():
            raise ValueError(f"Checkpoint {folder} is incomplete: {rel} is missing.")
        if p.stat().st_size != size:
            raise ValueError(f"Checkpoint {folder} is damaged: {rel} has {p.stat().st_size} bytes, expected {size}.")
    return manifest


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint named by ``latest`` (or, if that pointer is missing or stale, the newest complete one)."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if target.is_dir() and (target / MANIFEST).is_file():
            return target
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(spec: str | None, checkpoints_root: Path) -> Path | None:
    """Resolve ``--resume-from-checkpoint``: ``latest`` (None if there is no checkpoint yet), a checkpoint folder,
    or a run/checkpoints folder (its latest checkpoint)."""
    if not spec:
        return None
    if spec == "latest":
        return latest_checkpoint(checkpoints_root)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--resume-from-checkpoint {spec}: no such checkpoint folder.")
    if (path / MANIFEST).is_file():
        verify_checkpoint(path)
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise ValueError(
        f"--resume-from-checkpoint {spec}: not a checkpoint (no {MANIFEST}) and holds no complete checkpoint-N folder."
    )


def remove_partial(root: Path) -> list[Path]:
    """Delete temporary folders left by interrupted checkpoint writes; returns what was removed."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".old-checkpoint-"):
                # A crash between moving an older copy of a step aside and renaming the new one: restore the old.
                final = p.with_name(p.name[len(".old-") :])
                if not final.exists() and (p / MANIFEST).is_file():
                    os.replace(p, final)
                    continue
            if p.name.startswith(_TMP_PREFIX) or p.name.startswith(".old-checkpoint-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune_checkpoints(root: Path, total_limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``total_limit`` (never ``keep``); returns the deleted folders."""
    if not total_limit or total_limit <= 0:
        return []
    found = [p for _, p in complete_checkpoints(root)]
    excess = len(found) - total_limit
    deleted = []
    for p in found:
        if excess <= 0:
            break
        if keep is not None and p.resolve() == Path(keep).resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        deleted.append(p)
        excess -= 1
    return deleted


def _commit(tmp: Path, final: Path) -> None:
    """The single rename that makes a checkpoint visible (replacing a previous one of the same step, if any)."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    accelerator, root: Path, step: int, total_limit: int | None = None, extra: dict | None = None
) -> Path:
    """Write ``checkpoint-<step>`` atomically with ``accelerator.save_state`` (call on every process)."""
    root = Path(root)
    final = root / f"checkpoint-{step}"
    tmp = root / f"{_TMP_PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_manifest(tmp, step, extra)
        fsync_tree(tmp)
        _commit(tmp, final)
        write_text_atomic(root / LATEST, final.name + "\n")
        prune_checkpoints(root, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final
