"""The errors a user can act on from their message alone, and disk-full detection for every writer.

`dora` prints a :class:`DoraError` as one line (``error: <message>``) and exits non-zero; anything else is a bug
and keeps its traceback. ``dora --debug`` (or ``DORA_DEBUG=1``) shows the traceback of a DoraError too. The
classes also derive from the built-in type callers caught before (``ValueError``, ``OSError``, ...), so an
``except ValueError`` written against an older version still catches a config error.

``dora_shapegen.errors`` sits at the namespace root (core/), beside the other shared helpers: it imports no stage,
so every stage can raise these errors.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# ENOSPC: the device is full; EDQUOT: the user's quota is (the same remedy: free space).
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Libraries that write from native code (safetensors' Rust writer) report the OS error only in their message.
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28")
# torch.save's zip writer reports a short write as "unexpected pos 576 vs 534", without the OS error: a failed
# write on a filesystem left with less than this free is taken as a full disk.
NEARLY_FULL_BYTES = 1 << 20


class DoraError(Exception):
    """An error whose message says what is wrong and where; `dora` prints it as one line."""


class ConfigError(DoraError, ValueError):
    """A run config that cannot be used: a broken YAML file, an unknown key, a value of the wrong kind."""


class CheckpointError(DoraError, RuntimeError):
    """A checkpoint that cannot be resumed from (damaged or incomplete), named with what is wrong with it."""


class DiskFullError(DoraError, OSError):
    """A write that failed because the disk (or the quota) is full; names the path being written."""

    def __init__(self, path: str | Path, detail: str = "") -> None:
        self.path = Path(path)
        message = f"disk full: no space left to write {self.path}"
        if detail:
            message += f" ({detail})"
        message += "; what was written before is kept: free some space and run the same command again"
        super().__init__(message)
        self.errno, self.filename = errno.ENOSPC, str(self.path)

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple:
        return type(self), (self.path,)  # survives a process pool's pickling with its message


def free_bytes(path: str | Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (or its nearest existing
    parent); None when that cannot be known."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(error: BaseException, path: str | Path | None = None) -> bool:
    """Whether ``error`` (or an error it was raised from) says the disk or the quota is full; with ``path``, also
    when a write there failed on a filesystem with (almost) no free space left, whatever the message."""
    if path is not None and isinstance(error, (OSError, RuntimeError)):
        free = free_bytes(path)
        if free is not None and free < NEARLY_FULL_BYTES:
            return True
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return True
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(error).lower() for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def disk_full_names(path: str | Path) -> Iterator[None]:
    """Turn a disk-full error raised inside the block into a :class:`DiskFullError` naming ``path``; every other
    error passes through unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if is_disk_full(error, path):
            raise DiskFullError(path, f"{type(error).__name__}: {error}") from error
        raise


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can act on, or None for an unexpected one (a bug)."""
    if isinstance(error, DoraError):
        message = str(error)
    elif isinstance(error, OSError) and is_disk_full(error):
        message = str(DiskFullError(error.filename or "a file", f"{type(error).__name__}: {error}"))
    elif isinstance(error, (FileNotFoundError, PermissionError)):
        message = str(error)
    else:
        return None
    return " ".join(message.split())  # one line, whatever it holds: a YAML error's own message spans several


def debug_from_environment() -> bool:
    return os.environ.get("DORA_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def run_reporting_errors(main: Callable[[], int | None], debug: bool | None = None) -> int:
    """Run an entry point; an error the user can act on is printed as ``error: <message>`` (exit code 1) unless
    ``debug`` (default: ``DORA_DEBUG=1``), which keeps its traceback. Other exceptions propagate: they are bugs."""
    debug = debug_from_environment() if debug is None else debug
    try:
        return int(main() or 0)
    except Exception as error:
        message = None if debug else user_error_message(error)
        if message is None:
            raise
        print(f"error: {message} (--debug or DORA_DEBUG=1: traceback)", file=sys.stderr)
        return 1
