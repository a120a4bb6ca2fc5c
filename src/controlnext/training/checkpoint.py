"""Atomic training checkpoints on top of ``accelerator.save_state``.

Layout under the run's ``checkpoints/`` folder::

    checkpoint-500/        a complete checkpoint (accelerate state + our trainable weights + checkpoint.json)
    checkpoint-1000/
    latest                 text file naming the newest complete checkpoint ("checkpoint-1000")

A checkpoint is written into ``.tmp-checkpoint-N`` by every process, flushed to disk (fsync of every file and
folder), then renamed to ``checkpoint-N`` in one ``os.replace``, after which ``latest`` is rewritten the same way
(temporary file, fsync, rename). A crash at any moment therefore leaves ``latest`` naming a complete checkpoint;
left-over temporary folders are removed by the next run. ``checkpoint.json`` (written last, before the rename)
lists every file with its size and SHA-256 (and its own SHA-256), so a checkpoint damaged afterwards (truncated,
or bytes changed in place) is detected when resuming; ``latest`` then falls back to the newest intact checkpoint,
with a warning.

:func:`check_resume_settings` is the one rule of both training loops for resuming under changed settings.

Also here: the lock that keeps two runs out of one output folder (:func:`lock_output_dir`), and
:func:`finish_safetensors`, which makes a written ``.safetensors`` file reproducible (metadata in sorted order)
and readable like any other output (the umask's mode, not the 0600 that safetensors gives its files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "LATEST",
    "MANIFEST",
    "OutputDirLocked",
    "check_resume_settings",
    "complete_checkpoints",
    "finish_safetensors",
    "latest_checkpoint",
    "lock_output_dir",
    "newest_intact_checkpoint",
    "prune_checkpoints",
    "remove_partial",
    "resolve_resume",
    "save_checkpoint",
    "verify_checkpoint",
    "write_text_atomic",
]

log = logging.getLogger("controlnext.train")

LATEST = "latest"
MANIFEST = "checkpoint.json"
LOCK_FILE = ".controlnext-train.lock"
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


def _default_mode() -> int:
    """The mode a newly created file gets here (0o644 under the usual umask 022)."""
    try:  # Linux reports the umask without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def finish_safetensors(path: Path) -> Path:
    """Rewrite a ``.safetensors`` header with its metadata in sorted order and give the file the default mode.

    safetensors writes metadata in hash-map order (different from one process to the next) and creates its files
    with mode 0600; after this, identical tensors and metadata give identical bytes, readable like other outputs.
    """
    path = Path(path)
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)  # the format aligns the tensor data to 8 bytes
        if len(text) == length:
            f.seek(8)
            f.write(text)
        else:  # a different escaping changed the length: rewrite the whole file
            f.seek(8 + length)
            data = f.read()
            f.seek(0)
            f.write(struct.pack("<Q", len(text)) + text + data)
            f.truncate()
    os.chmod(path, _default_mode())
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, step: int, extra: dict | None) -> None:
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"step": step, "files": files, **(extra or {})}
    manifest[_SELF_HASH] = _manifest_hash(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


_SELF_HASH = "manifest_sha256"


def _manifest_hash(manifest: dict) -> str:
    """SHA-256 of the manifest without its own hash (its step and losses are read from it on resume)."""
    body = {k: v for k, v in manifest.items() if k != _SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify_checkpoint(folder: Path) -> dict:
    """Check a checkpoint folder against its manifest (every file's size and SHA-256); returns the manifest or
    raises ValueError naming what is wrong. Manifests of older versions hold sizes only; those are checked."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(
            f"{folder} is not a complete checkpoint (no {MANIFEST}; was it written by an interrupted run?)."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest_path} is damaged: {err}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"{manifest_path} is damaged: it lists no files.")
    if _SELF_HASH in manifest and manifest[_SELF_HASH] != _manifest_hash(manifest):
        raise ValueError(f"{manifest_path} is damaged: its content changed (SHA-256 mismatch).")
    for rel, entry in files.items():
        size, digest = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (entry, None)
        p = folder / rel
        if not p.is_file():
            raise ValueError(f"Checkpoint {folder} is incomplete: {rel} is missing.")
        if p.stat().st_size != size:
            raise ValueError(f"Checkpoint {folder} is damaged: {rel} has {p.stat().st_size} bytes, expected {size}.")
        if digest is not None and _sha256(p) != digest:
            raise ValueError(f"Checkpoint {folder} is damaged: the content of {rel} changed (SHA-256 mismatch).")
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


def newest_intact_checkpoint(root: Path) -> Path | None:
    """The checkpoint named by ``latest`` if it verifies, else the newest one that does (a warning names what was
    wrong with each skipped one); None if there is no checkpoint. Raises ValueError if none verifies."""
    root = Path(root)
    first = latest_checkpoint(root)
    if first is None:
        return None
    candidates = [first] + [p for _, p in reversed(complete_checkpoints(root)) if p != first]
    problems = []
    for folder in candidates:
        try:
            verify_checkpoint(folder)
        except ValueError as err:
            problems.append(str(err))
            continue
        if problems:
            log.warning("Resuming from %s, the newest intact checkpoint; skipped: %s", folder, " ".join(problems))
        return folder
    raise ValueError(
        f"No intact checkpoint in {root} to resume from: {' '.join(problems)} Start a new run in another "
        "--output-dir, or drop --resume-from-checkpoint."
    )


def resolve_resume(spec: str | None, checkpoints_root: Path) -> Path | None:
    """Resolve ``--resume-from-checkpoint`` to a verified checkpoint folder: ``latest`` (None if there is no
    checkpoint yet) or a run/checkpoints folder give its newest intact checkpoint; a checkpoint folder itself must
    be intact."""
    if not spec:
        return None
    if spec == "latest":
        return newest_intact_checkpoint(checkpoints_root)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--resume-from-checkpoint {spec}: no such checkpoint folder.")
    if (path / MANIFEST).is_file():
        verify_checkpoint(path)
        return path
    for root in (path, path / "checkpoints"):
        found = newest_intact_checkpoint(root)
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
        for path in sorted(tmp.rglob("*.safetensors")):
            finish_safetensors(path)
        _write_manifest(tmp, step, extra)
        fsync_tree(tmp)
        _commit(tmp, final)
        write_text_atomic(root / LATEST, final.name + "\n")
        prune_checkpoints(root, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


class OutputDirLocked(ValueError):
    """Another training run holds the output folder."""


@contextlib.contextmanager
def lock_output_dir(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` for the block, or raise :class:`OutputDirLocked` at once.

    Two runs writing into one folder would delete each other's temporary checkpoints. The lock is an OS file lock
    (``flock``), so it goes with its process: a run that was killed leaves no lock behind.
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputDirLocked(
            f"{folder} is in use by another training run (it holds {folder / LOCK_FILE}); wait for it to finish or "
            "choose another --output-dir."
        ) from None
    try:
        yield
    finally:
        lock.release()


def check_resume_settings(
    checkpoint: str | Path, saved: dict, current: dict, allow_changed: bool = False, warn: bool = True
) -> None:
    """Refuse to resume ``checkpoint`` when a setting that decides the data order changed since it was written.

    ``saved`` and ``current`` map setting names to values (a setting the checkpoint does not record is not
    compared). The ValueError names each change as ``setting: old -> new``; with ``allow_changed``
    (``--allow-changed-settings``) it is a warning instead (logged when ``warn``), and training continues with
    the new settings.
    """
    changed = [f"{k}: {saved[k]} -> {v}" for k, v in current.items() if k in saved and saved[k] != v]
    if not changed:
        return
    what = f"Checkpoint {checkpoint} was written with different data settings ({', '.join(changed)})"
    if not allow_changed:
        raise ValueError(
            f"{what}: resume with the same settings, or pass --allow-changed-settings to continue with the new ones "
            "(the data order then differs from the original run)."
        )
    if warn:
        log.warning("%s; continuing with the new ones (--allow-changed-settings): the data order differs.", what)
