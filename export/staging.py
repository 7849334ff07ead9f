"""Where a command writes: OUT is checked before any work, built in a temporary directory beside it, and moved
into place only once complete (stage "commit" of export and quantization)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from fastllm.errors import ExportError, FastLLMError


def check_destination(out: Path, overwrite: bool, *, sources: Iterable[Path] = ()) -> None:
    """Refuse an OUT that the command must not write: sources are the directories it reads from."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT {str(out)!r} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"OUT {str(out)!r} exists and is not empty; choose another path or pass --overwrite")


def commit(tmp: Path, out: Path) -> None:
    """Move the finished directory into place, replacing OUT only now that the new one is complete."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging(out: Path, what: str):
    """A temporary directory beside OUT that becomes OUT when the block completes, and vanishes when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        commit(tmp, out)
    except FastLLMError:
        raise
    except Exception as e:
        raise ExportError(f"{what} failed: {type(e).__name__}: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
