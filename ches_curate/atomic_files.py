"""Files replaced atomically: written beside their final path, then renamed into place.

`replace_atomically` is the one way ches_curate writes an output a user or a later step
reads whole (exports, `sql --output`, generated pairs): the path is either complete or
as it was, no staging file is left behind, and the result gets the mode a plain
`open()` or `mkdir()` would give under the process umask.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


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
