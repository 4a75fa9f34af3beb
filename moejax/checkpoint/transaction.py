"""Write, verify, commit: how every checkpoint operation puts a directory in place.

An operation writes into `DST.tmp-PID`, verifies what it wrote, and only then moves it to DST
(`commit_dir`); an existing DST is replaced only when the caller was given --force, and only after
the new one verified. A killed run leaves its temporary directory, which the next run removes
(`remove_stale`). `check_destination` refuses, before anything is written, a DST that is, holds, is
held by or links to a source: replacing it would delete what the operation was given.
"""

from __future__ import annotations

import os
import re
import shutil

from moejax.errors import UserError


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def check_destination(dst: str, sources: dict[str, str], force: bool | None, what: str = "replace it",
                      add_to: bool = False) -> None:
    """One line, before any write, for a DST that cannot be written: the same as, inside, containing
    or a link to one of `sources` ({flag: path}), or a source named like DST's temporary directories
    (which `remove_stale` would delete); not a directory; or a non-empty directory without `force`
    (`what` says what --force would do; `add_to`: a new step is added, nothing replaced; `force`
    None: the command never replaces anything, so any existing DST is refused)."""
    real = os.path.realpath(dst)
    base = os.path.basename(os.path.abspath(dst))
    for flag, src in sources.items():
        if re.fullmatch(re.escape(base) + r"\.(tmp|old)-\d+", os.path.basename(os.path.abspath(src))):
            raise UserError(f"{flag} {src[:200]!r} is named like a temporary directory of DST {dst[:200]!r}, which a "
                            f"run would remove: rename it first")
        s = os.path.realpath(src)
        if real == s:
            how = "a link to" if os.path.islink(dst) or os.path.islink(src) else "the same directory as"
            raise UserError(f"DST {dst[:200]!r} is {how} {flag} {src[:200]!r}: write to a new directory")
        if _within(real, s):
            raise UserError(f"DST {dst[:200]!r} is inside {flag} {src[:200]!r}: write outside it")
        if _within(s, real):
            raise UserError(f"DST {dst[:200]!r} contains {flag} {src[:200]!r}"
                            + ("" if add_to else ", which --force would delete") + ": write to a new directory")
    if force is None and os.path.lexists(dst):
        raise UserError(f"{dst[:200]!r} exists: give a new directory (nothing is overwritten)")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UserError(f"{dst[:200]!r} exists and is not a directory: give a new path or a directory")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise UserError(f"{dst[:200]!r} exists: pass --force to {what}")


def staging_dir(dst: str) -> str:
    """A fresh temporary directory name beside `dst` (stale ones of killed runs removed first)."""
    remove_stale(dst)
    tmp = os.path.abspath(dst) + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def commit_dir(tmp: str, dst: str) -> None:
    """Move a finished `tmp` to `dst`; an existing `dst` is replaced only after the move can happen
    (a `dst` that is a symbolic link is replaced as a link: its target is left alone)."""
    if os.path.lexists(dst):
        old = dst + f".old-{os.getpid()}"
        os.rename(dst, old)
        os.rename(tmp, dst)
        if os.path.islink(old):
            os.unlink(old)
        else:
            shutil.rmtree(old)
    else:
        os.rename(tmp, dst)


def remove_stale(dst: str) -> None:
    """Remove `dst.tmp-PID` directories of runs that no longer exist (killed midway)."""
    parent, base = os.path.split(os.path.abspath(dst))
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for n in names:
        if n.startswith(base + ".tmp-") and n[len(base) + 5:].isdigit():
            pid = int(n[len(base) + 5:])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(parent, n), ignore_errors=True)
            except PermissionError:
                pass
