"""What a path or directory entry named like audio (or a CSV) is, decided by `os.scandir` / `stat` /
`os.access` alone: nothing is opened, since opening a FIFO blocks. A readable regular file has no problem;
anything else is a `FileProblem` (`not_regular_file` or `unreadable_file`), or for a CSV a `ManifestError`."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from pipeline.clips import NOT_REGULAR_FILE, UNREADABLE_FILE, FileProblem, ManifestError


FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def entry_problem(entry: os.DirEntry) -> FileProblem | None:
    """None for a readable regular file (or a link to one). Decided from the directory entry and stat alone:
    nothing is opened, since opening a FIFO blocks."""
    try:
        if entry.is_file():
            return readability(entry.path)
        mode = entry.stat().st_mode
    except OSError as error:
        return FileProblem(NOT_REGULAR_FILE, f"a symlink whose target cannot be reached ({error.strerror})")
    what = next((name for is_kind, name in FILE_KINDS if is_kind(mode)), f"an entry of mode {stat.filemode(mode)}")
    link = "a symlink to " if entry.is_symlink() else ""
    return FileProblem(NOT_REGULAR_FILE, f"{link}{what}, not a regular file")


def follows_to(check: Callable[[], bool]) -> bool:
    """`entry.is_file` / `entry.is_dir` (which follow symlinks), False where following fails (a symlink loop)."""
    try:
        return check()
    except OSError:
        return False


def readability(path: str) -> FileProblem | None:
    if os.access(path, os.R_OK):
        return None
    return FileProblem(UNREADABLE_FILE, "a regular file without read permission")


def path_problem(path: str) -> tuple[bool, FileProblem | None]:
    """(whether anything is at path, why it is not a readable regular file or None). Decided by stat alone:
    nothing is opened, since opening a FIFO blocks."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if os.path.lexists(path):
            return True, FileProblem(NOT_REGULAR_FILE, f"a symlink whose target cannot be reached ({error.strerror})")
        return False, None
    if stat.S_ISREG(mode):
        return True, readability(path)
    what = next((name for is_kind, name in FILE_KINDS if is_kind(mode)), f"an entry of mode {stat.filemode(mode)}")
    link = "a symlink to " if os.path.islink(path) else ""
    return True, FileProblem(NOT_REGULAR_FILE, f"{link}{what}, not a regular file")


def check_csv_file(path: str, what: str) -> None:
    """Refuse a CSV path that is missing or not a regular file (opening a FIFO would block the job)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ManifestError(f"{what} {path} does not exist ({error.strerror})") from error
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in FILE_KINDS if is_kind(mode)), "not a regular file")
        raise ManifestError(f"{what} {path} is {kind}, not a regular file")
