"""Output directories: which ones refusal-dir writes into, locks, replaces and deletes.

The rules (tested in ``tests/unit/test_faults.py``):

* **Ownership.** An output directory is refusal-dir's when it holds the marker file
  :data:`MARKER_NAME` (a small JSON record written when refusal-dir creates the directory or
  first writes into an empty one). A directory that already holds other files is refused; one
  written by an earlier version (nothing in it but the files this tool writes) is adopted.
* **Deletion.** ``--fresh`` (and ``export`` replacing an earlier export) deletes only a marked
  directory, only after every input was validated, and never the current directory or one of
  its parents, the home directory, the file-system root, or a directory that holds the
  directions being read.
* **One run at a time.** A run holds an exclusive, non-blocking ``flock`` on
  :data:`LOCK_NAME` inside the directory for as long as it writes there; a second run is
  refused with one line. The lock goes away with the process, also when it is killed.
* **Atomic writes.** Every file is written to a temporary file beside it and renamed into
  place; a failed write removes its temporary file. Whole directories (the extracted directions,
  an exported model) are built beside their destination and swapped in.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from refusal_dir.errors import OutputDirError

try:  # POSIX only; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

MARKER_NAME = ".refusal_dir-output"
LOCK_NAME = ".refusal_dir.lock"
TEMP_PREFIX = ".refusal_dir-"
TEMP_SUFFIX = ".tmp"
STAGING_SUFFIX = ".partial"

#: What a results directory of an earlier version (written before the marker existed) may hold.
RESULT_NAMES = frozenset(
    {
        "config.resolved.yaml", "directions", "sweep", "results.json", "results.csv", "report.md",
        "figures", "tune.json", "tune.md", "resume.json", MARKER_NAME, LOCK_NAME,
    }
)
#: The note an exported model directory of an earlier version carries.
LEGACY_EXPORT_NOTE = "refusal_dir_edit.json"

KINDS = ("results", "model", "activations")
#: How an error names each kind of directory.
_KIND_NAMES = {"results": "run results", "model": "an exported model", "activations": "an activation store"}


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose another --output-dir",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another --output-dir",
    errno.EROFS: "the file system is read-only: choose a writable --output-dir",
    errno.EACCES: "permission denied: choose a writable --output-dir",
    errno.EPERM: "permission denied: choose a writable --output-dir",
}


def write_error(path: Path | str, error: OSError) -> OutputDirError:
    """One-line :class:`OutputDirError` for a failed write, naming the path and the fix."""
    reason = error.strerror or str(error) or type(error).__name__
    hint = _HINTS.get(error.errno or 0, "choose a writable --output-dir")
    return OutputDirError(f"cannot write {path} ({reason}): {hint}")


def os_error_message(error: OSError) -> str:
    """One line for an ``OSError`` that escaped the checks (the CLI's last resort)."""
    reason = error.strerror or str(error) or type(error).__name__
    where = f"{error.filename}: " if error.filename else ""
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    hint = _HINTS[error.errno or 0] if full else "check the path, its permissions and free space"
    return " ".join(f"{where}{reason}: {hint}".split())


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds.

    On any error the temporary file is removed and an ``OSError`` becomes a one-line
    :class:`OutputDirError`.
    """
    path = Path(path)
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
        os.close(handle)
    except OSError as error:
        raise write_error(path, error) from error
    temporary = Path(name)
    try:
        yield temporary
        if temporary.exists():  # mkstemp creates 0600: give it the mode any new file gets
            temporary.chmod(0o666 & ~current_umask())
        os.replace(temporary, path)
    except OSError as error:
        raise write_error(path, error) from error
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (nothing left on error)."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically, creating the parent folders."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(path, error) from error
    atomic_write_bytes(path, json.dumps(payload, indent=2).encode())


# ----------------------------------------------------------------------------------------------
# Ownership and validation
# ----------------------------------------------------------------------------------------------


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker record of ``directory``, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("tool") == "refusal_dir" else None


def owner_kind(directory: Path) -> str | None:
    """``"results"``, ``"model"`` or ``"activations"`` for a directory refusal-dir wrote, else None."""
    marker = read_marker(directory)
    if marker is not None:
        kind = marker.get("kind")
        return kind if kind in KINDS else None
    try:
        names = {entry.name for entry in directory.iterdir()}
    except OSError:
        return None
    if LEGACY_EXPORT_NOTE in names:
        return "model"
    # An unmarked directory of an earlier version: only our own names, and at least one of the
    # files every command of that version wrote (a folder that merely holds "directions/" or
    # "figures/" may be the user's).
    ours = {n for n in names if n in RESULT_NAMES or n.startswith(TEMP_PREFIX)}
    if ours == names and names & {"config.resolved.yaml", "tune.json"}:
        return "results"
    return None


def _is_empty(directory: Path) -> bool:
    return not any(entry.name not in (LOCK_NAME, MARKER_NAME) for entry in directory.iterdir())


def _resolve(path: Path | str) -> Path:
    return Path(path).expanduser().resolve()


def check_deletable(path: Path, *, protect: Iterable[Path | str] = (), flag: str = "--output-dir") -> None:
    """Refuse to delete the cwd or a parent of it, home, the root, or a protected directory."""
    target = _resolve(path)
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputDirError(
            f"{flag} {path} is the current directory or one of its parents: refusal-dir never "
            f"deletes it; choose a new {flag}"
        )
    if target == home or target in home.parents or target.parent == target:
        raise OutputDirError(f"{flag} {path} is the home directory, a parent of it or the root: choose a new {flag}")
    for protected in protect:
        kept = _resolve(protected)
        if kept == target or target in kept.parents:
            raise OutputDirError(
                f"{flag} {path} holds {protected}, which this command reads: it cannot be "
                f"deleted or replaced; choose another {flag}"
            )


def check_output_dir(
    path: Path | str,
    *,
    kind: str = "results",
    fresh: bool = False,
    protect: Iterable[Path | str] = (),
    flag: str = "--output-dir",
) -> Path:
    """Validate an output directory without touching it; raise :class:`OutputDirError`.

    It must be new, empty, or one refusal-dir wrote for the same ``kind`` of output; with
    ``fresh`` (delete what is there) it must also pass :func:`check_deletable`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if str(path).strip() == "":
        raise OutputDirError(f"{flag} is empty: name a directory")
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{flag} {path} is a file, not a directory: choose a directory path")
    _check_writable(path, flag)
    protect = list(protect)
    if fresh:
        check_deletable(path, protect=protect, flag=flag)
    if not path.is_dir():
        return path
    try:
        empty = _is_empty(path)
    except OSError as error:
        raise OutputDirError(f"cannot read {flag} {path} ({error.strerror or error}): choose another {flag}") from error
    if empty:
        return path
    owner = owner_kind(path)
    if owner is None:
        raise OutputDirError(
            f"{flag} {path} already holds files refusal-dir did not write (no {MARKER_NAME} "
            f"marker): nothing was changed there; choose a new or empty {flag}"
        )
    if owner != kind:
        raise OutputDirError(f"{flag} {path} holds {_KIND_NAMES[owner]}, not {_KIND_NAMES[kind]}: choose another {flag}")
    if fresh and read_marker(path) is None:
        raise OutputDirError(
            f"{flag} {path} has no {MARKER_NAME} marker (an earlier version's output): --fresh "
            f"deletes only marked directories; delete it yourself or choose a new {flag}"
        )
    return path


def _check_writable(path: Path, flag: str) -> None:
    """The directory, or its nearest existing ancestor, must be a writable directory."""
    existing = path.absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(f"{flag} {path} is inside {existing}, which is a file: choose a writable {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        reason = "the file system is read-only" if read_only else "permission denied"
        raise OutputDirError(f"cannot write to {existing} for {flag} {path} ({reason}): choose a writable {flag}")


def write_marker(directory: Path, kind: str) -> None:
    if read_marker(directory) is not None:
        return
    from refusal_dir import __version__

    record = {
        "tool": "refusal_dir",
        "kind": kind,
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": "written by refusal-dir; `--fresh` may delete this directory's contents",
    }
    atomic_write_text(directory / MARKER_NAME, json.dumps(record, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Locking
# ----------------------------------------------------------------------------------------------

_HELD: dict[Path, list[Any]] = {}  # resolved directory -> [open lock file, depth]


@contextlib.contextmanager
def lock_output_dir(directory: Path | str, *, flag: str = "--output-dir") -> Iterator[Path]:
    """Hold the directory's exclusive lock (re-entrant within this process); ``flag`` names the
    option that chose the directory in the refusal."""
    directory = Path(directory)
    key = _resolve(directory)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield directory
        finally:
            _HELD[key][1] -= 1
        return
    try:
        handle = open(directory / LOCK_NAME, "a+b")  # noqa: SIM115 - held across the yield
    except OSError as error:
        raise write_error(directory / LOCK_NAME, error) from error
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise OutputDirError(
                    f"another refusal-dir run holds {directory}: wait for it to finish or choose "
                    f"another {flag}"
                ) from error
        _HELD[key] = [handle, 1]
        try:
            yield directory
        finally:
            del _HELD[key]
    finally:
        handle.close()  # closing releases the flock


# ----------------------------------------------------------------------------------------------
# Claiming a directory for a run
# ----------------------------------------------------------------------------------------------


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def clear_contents(directory: Path) -> None:
    """Delete everything in ``directory`` but its lock and marker (call with the lock held)."""
    for entry in directory.iterdir():
        if entry.name not in (LOCK_NAME, MARKER_NAME):
            _remove(entry)


def remove_leftovers(directory: Path) -> None:
    """Remove temporary files and half-built directories a killed run left behind."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(OSError):
                    (Path(root) / name).unlink()
        for name in list(dirs):
            if name.startswith(TEMP_PREFIX) and name.endswith(STAGING_SUFFIX):
                _restore_set_aside(Path(root) / name)
                shutil.rmtree(Path(root) / name, ignore_errors=True)
                dirs.remove(name)


def _restore_set_aside(leftover: Path) -> None:
    """Put back a directory that :func:`swap_in` set aside when a crash kept its successor out."""
    if "-old-" not in leftover.name:
        return
    for kept in leftover.iterdir():
        target = leftover.parent / kept.name
        if not target.exists() and not target.is_symlink():
            with contextlib.suppress(OSError):
                os.replace(kept, target)


@contextlib.contextmanager
def claim_output_dir(
    path: Path | str,
    *,
    kind: str = "results",
    fresh: bool = False,
    protect: Iterable[Path | str] = (),
    flag: str = "--output-dir",
) -> Iterator[Path]:
    """Validate, create, lock and mark an output directory; with ``fresh`` empty it first.

    The lock is held until the block ends. Call this only after every other input was
    validated: ``fresh`` deletes here.
    """
    protect = list(protect)
    directory = check_output_dir(path, kind=kind, fresh=fresh, protect=protect, flag=flag)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(directory, error) from error
    with lock_output_dir(directory, flag=flag):
        # Checked again under the lock: another run may have written here since.
        check_output_dir(directory, kind=kind, fresh=fresh, protect=protect, flag=flag)
        try:
            if fresh:
                clear_contents(directory)
            remove_leftovers(directory)
            write_marker(directory, kind)
        except OSError as error:
            raise write_error(directory, error) from error
        yield directory


# ----------------------------------------------------------------------------------------------
# Whole directories built beside their destination
# ----------------------------------------------------------------------------------------------


def staging_dir(parent: Path, name: str) -> Path:
    """A new empty directory in ``parent`` to build ``name`` in (see :func:`swap_in`)."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f"{TEMP_PREFIX}{name}-", suffix=STAGING_SUFFIX))
        # mkdtemp makes it private (0700); the swapped-in directory gets the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        return staging
    except OSError as error:
        raise write_error(parent / name, error) from error


def swap_in(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` directory to ``target``, replacing what was there.

    The old ``target`` is renamed aside first and deleted only once the new one is in place;
    an error or Ctrl-C in between puts it back; a kill in between leaves it as
    ``.refusal_dir-<name>-old-*.partial`` beside the target, and the next run's
    :func:`remove_leftovers` puts it back.
    """
    old: Path | None = None
    try:
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}-old-", suffix=STAGING_SUFFIX))
            os.replace(target, old / target.name)
        os.replace(staging, target)
    except BaseException as error:  # Ctrl-C too: never leave the target missing
        if old is not None and not target.exists() and (old / target.name).exists():
            os.replace(old / target.name, target)
        if isinstance(error, OSError):
            raise write_error(target, error) from error
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def display_path(text: str) -> str:
    """``text`` as a saved report shows it: an absolute path becomes relative to the working
    directory, or only its name when outside it (no report holds a path of this machine);
    anything else is returned unchanged."""
    flag, equals, value = text.partition("=")
    if equals and flag.startswith("--"):
        return f"{flag}={display_path(value)}"
    path = Path(text)
    if not path.is_absolute():
        return text
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return f".../{path.name}"
