"""Files replaced atomically: written beside their final path, then renamed into place.

`replace_atomically` is the one way ches_curate writes an output a user or a later step
reads whole (exports, `sql --output`, generated pairs): the path is either complete or
as it was, no staging file is left behind, and the result gets the mode a plain
`open()` or `mkdir()` would give under the process umask.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ches_curate.errors import ChesCurateError

T = TypeVar("T")
_WRITE_FIXES = {  # how to fix a failed --output write, by errno
    errno.ENOSPC: "free some space or choose another --output",
    errno.EDQUOT: "free some space or choose another --output",
    errno.EACCES: "choose an --output in a directory you can write to",
    errno.EPERM: "choose an --output in a directory you can write to",
    errno.EROFS: "choose an --output on a writable file system",
    errno.ENOENT: "create the directory first",
    errno.ENOTDIR: "choose an --output whose folders are folders",
    errno.EISDIR: "give --output a file name, not a directory",
}


def write_output(output: Path, write: Callable[[Path], T], *, parents: bool = False) -> T:
    """`replace_atomically` for a file the user named: with `parents` its folders are made first, and any
    `OSError` (a full disk, a read-only or missing folder, a directory at `output`) is one `ChesCurateError`
    naming `output` and the fix, with `output` as it was."""
    try:
        if parents:
            output.parent.mkdir(parents=True, exist_ok=True)
        if output.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(output))
        return replace_atomically(output, write)
    except OSError as err:
        raise ChesCurateError(f"cannot write {output}: {err.strerror or err}; nothing was written "
                              f"({_WRITE_FIXES.get(err.errno, 'check the path')} and rerun)") from err


def replace_atomically(output: Path, write: Callable[[Path], T], *, directory: bool = False) -> T:
    """`write(staging)` on a hidden file (a folder with `directory`) beside `output`, then rename it to `output`;
    returns what `write` returned.

    The folder of `output` must exist. Any error leaves `output` as it was and removes the
    staging path; an `OSError` (a full disk, a read-only folder) propagates for the caller to word.
    """
    if directory:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
        os.close(handle)
        staging = Path(name)
    try:
        os.chmod(staging, (0o777 if directory else 0o666) & ~umask())  # mkstemp/mkdtemp make it private
        result = write(staging)
        if directory and output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            os.replace(output, old / output.name)
            os.replace(staging, output)
            shutil.rmtree(old)
        else:
            os.replace(staging, output)
        return result
    finally:
        if staging.is_dir():
            shutil.rmtree(staging)
        elif staging.exists():
            staging.unlink()


def umask() -> int:
    """The process umask; reading it means setting it, so it is put straight back."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
