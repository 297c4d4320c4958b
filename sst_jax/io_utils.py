"""Atomic file and folder writes, readable-file checks and content hashing shared by every package.

Nothing is ever half-written: data goes to a temporary file in the target directory and is
renamed over the destination (rename is atomic on POSIX within one filesystem).

Folders (`atomic_directory`) are written completely into a hidden sibling
`.<name>.new-<pid>-<token>` and then swapped in with two renames:

    1. <target>                        -> .<name>.old-<pid>-<token>   (only if target exists)
    2. .<name>.new-<pid>-<token>       -> <target>
    3. remove .<name>.old-<pid>-<token>

A process killed at any point leaves one of these states, which `recover_directory` (run by
every folder writer before it starts and by the adapter / model loaders before they read)
repairs, for siblings whose writer process is no longer alive:

    killed while writing (before 1)   target = old folder; .new-* is partial -> .new-* removed
    killed between 1 and 2            target missing; .old-T and complete .new-T -> .new-T
                                      renamed to target (roll forward), .old-T removed
    killed between 2 and 3            target = new folder; .old-* left -> removed

So a reader sees either the complete old folder or the complete new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from absl import logging

from sst_jax.errors import OutputError, PermissionDeniedError


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it over `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; a new file gets the umask's mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "__jax_array__") or type(obj).__name__ == "ArrayImpl":
        return np.asarray(obj).tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def stable_hash(obj: Any, *, length: int = 16) -> str:
    """Hash of a JSON-able description (dict keys sorted): the key of a cache entry."""
    text = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


# ---------------------------------------------------------------------------------------------
# Readable files


def ensure_readable(path: str | os.PathLike, what: str = "file") -> Path:
    """Opens `path` for reading once; a PermissionError becomes PermissionDeniedError naming it.

    Readers call this before handing the file to a parser (safetensors, gguf, json), whose own
    errors would otherwise report an unreadable file as corrupt.
    """
    path = Path(path)
    try:
        with open(path, "rb"):
            pass
    except PermissionError as err:
        raise permission_denied(path, what) from err
    return path


def permission_denied(path: str | os.PathLike, what: str = "file") -> PermissionDeniedError:
    path = Path(path)
    try:
        st = path.stat()
        detail = f" (mode {st.st_mode & 0o777:o}, owner uid {st.st_uid}; this process runs as uid {os.geteuid()})"
    except OSError:
        detail = ""
    return PermissionDeniedError(f"cannot read {what} {path}: permission denied{detail}. Give this user "
                                 f"read access (e.g. chmod u+r '{path}') or run as its owner")


# ---------------------------------------------------------------------------------------------
# Atomic folders

_SIBLING_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>new|old)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)$")
_ACTIVE: set[str] = set()  # tokens of swaps in progress in this process (not leftovers)
_ACTIVE_LOCK = threading.Lock()
_PAUSE_ENV = "SST_JAX_ATOMIC_PAUSE_AT"

# Files an earlier output folder may hold besides the ones the new write produces (PEFT's model
# card, sharded weights, …). A folder holding anything else (or any subfolder) is not replaced.
REPLACEABLE_EXTRA = ("README.md", ".gitattributes", "*.safetensors", "*.safetensors.index.json",
                     "generation_config.json", "adapter_model.bin", "training_args.bin",
                     "merge_report.json", "merge_report.md")


def pause_point(stage: str) -> None:
    """Test hook: with SST_JAX_ATOMIC_PAUSE_AT=<stage> the process reports the stage on stderr
    and sleeps, so a test can SIGKILL it exactly there. No effect otherwise."""
    if os.environ.get(_PAUSE_ENV) == stage:
        sys.stderr.write(f"SST_JAX_PAUSED {stage}\n")
        sys.stderr.flush()
        time.sleep(3600)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own swaps in progress are in _ACTIVE; anything else of ours is left over
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(target: Path) -> dict[str, dict[str, Path]]:
    """{token: {"new"/"old": path}} of the swap folders of `target` left by writers now dead."""
    out: dict[str, dict[str, Path]] = {}
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return out
    for entry in entries:
        m = _SIBLING_RE.match(entry.name)
        if m is None or m["name"] != target.name:
            continue
        with _ACTIVE_LOCK:
            if m["token"] in _ACTIVE:
                continue
        if _pid_alive(int(m["pid"])):
            continue
        out.setdefault(m["token"], {})[m["kind"]] = entry
    return out


def recover_directory(target: str | os.PathLike) -> bool:
    """Repairs what an interrupted `atomic_directory` swap of `target` left behind.

    Returns True if `target` was restored (rolled forward). Never touches the swap folders of
    a writer that is still running. Errors (read-only filesystem, …) are logged, not raised:
    recovery is best effort and a reader then reports what it finds.
    """
    target = Path(target)
    restored = False
    for token, kinds in sorted(_siblings(target).items()):
        new, old = kinds.get("new"), kinds.get("old")
        try:
            if old is not None and not os.path.lexists(target):
                # Killed between the two renames: the new folder was complete before step 1.
                chosen = new if new is not None else old
                os.rename(chosen, target)
                restored = True
                logging.warning("recovered %s from an interrupted write (used %s)", target, chosen.name)
                new = None if chosen is new else new
                old = None if chosen is old else old
            for leftover in (new, old):
                if leftover is not None and leftover.exists():
                    shutil.rmtree(leftover)
                    logging.info("removed %s left by an interrupted write of %s", leftover.name, target)
        except OSError as err:
            logging.warning("could not recover %s from an interrupted write (%s)", target, err)
    return restored


def default_replace_check(old: Path, new: Path) -> None:
    """Refuses to replace a folder that is not an earlier output of the same kind.

    Replaceable: an empty folder, or one holding only files whose names the new folder also
    has or that match REPLACEABLE_EXTRA. Anything else (a subfolder, a user's notes, a home
    directory passed as --output) raises OutputError and is left untouched.
    """
    produced = {p.name for p in new.iterdir()}
    foreign = []
    for entry in sorted(old.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            foreign.append(entry.name + "/")
        elif entry.name not in produced and not any(fnmatch.fnmatch(entry.name, pat) for pat in REPLACEABLE_EXTRA):
            foreign.append(entry.name)
    if foreign:
        raise OutputError(f"{old} already exists and holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
                          f"this write would delete ({', '.join(foreign[:5])}{', …' if len(foreign) > 5 else ''}); "
                          "it does not look like an earlier output. Choose a new or empty folder, or move those "
                          "files away")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *,
                     check_replace: Callable[[Path, Path], None] | None = default_replace_check) -> Iterator[Path]:
    """Yields a new empty folder beside `target`; when the block succeeds it replaces `target`.

    The folder gets the umask's mode (like `mkdir`). The swap is two renames (see the module
    docstring for the states an interruption can leave and how they are recovered). If the
    block raises, `target` is untouched and the new folder is removed. `check_replace(old,
    new)` may raise to refuse replacing an existing `target` (None: always replace).
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    if os.path.lexists(target) and not target.is_dir():
        raise OutputError(f"{target} exists and is not a folder; pass a folder path (or remove the file)")
    while True:
        token = secrets.token_hex(6)
        new = parent / f".{target.name}.new-{os.getpid()}-{token}"
        try:
            os.mkdir(new, 0o777)  # mode & ~umask, as for any new folder
            break
        except FileExistsError:
            continue
    with _ACTIVE_LOCK:
        _ACTIVE.add(token)
    try:
        yield new
        pause_point("before-swap")
        if target.exists():
            if check_replace is not None:
                check_replace(target, new)
            old = parent / f".{target.name}.old-{os.getpid()}-{token}"
            os.rename(target, old)
            pause_point("between-renames")
            try:
                os.rename(new, target)
            except BaseException:
                os.rename(old, target)  # put the old folder back; the new one is removed below
                raise
            pause_point("before-cleanup")
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(new, target)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(token)
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)
