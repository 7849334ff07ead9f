"""Where a command writes: OUT is checked before any work, built in a temporary directory beside it, and moved
into place only once complete (stage "commit" of export and quantization).

No data loss: a command never writes into, or replaces, a directory it reads from, and `--overwrite` replaces only a
fastllm model directory holding nothing but model files. The rules:
- OUT and every source are disjoint: OUT may not be a source, contain one, or lie inside one (symlinks and `..`
  resolved). OUT inside a source would not touch the source's own files, but the staging directory, the old OUT set
  aside and the result would all appear inside a directory the command is reading (quantization copies its
  source's files, and a later `--overwrite` of that source would then meet an unrelated subdirectory): one simple
  rule instead.
- OUT may be absent or an empty directory. A non-empty OUT is replaced only with `--overwrite`, only if it is a
  fastllm model directory (fastllm.json with a format_version) and only if every entry in it is a file fastllm
  writes (MODEL_FILES); anything else is listed in the refusal, never deleted.
- OUT may not be a symbolic link (replacing it would replace the link, not the directory it points to).
- The new model is complete in `.OUT.tmp-*` beside OUT before OUT is touched; commit re-checks OUT, renames it aside
  (`.OUT.old-*`), renames the new one in (putting the old one back if that fails), and only then deletes the old
  one's model files, file by file; a directory left non-empty is kept, not removed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from fastllm.errors import ExportError, FastLLMError
from fastllm.manifest import MANIFEST_NAME

# Every file an export or a quantization writes into a model directory (tests/test_overwrite.py checks this against
# export.trace GRAPH_FILE / DATA_FILE and export.pipeline TOKENIZER_FILES; they are not imported here to keep this
# module free of torch).
MODEL_FILES = frozenset({"model.onnx", "model.onnx.data", "prefill.onnx", "prefill.onnx.data", MANIFEST_NAME,
                         "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"})


def is_model_directory(directory: Path) -> bool:
    """A directory with fastllm.json whose JSON object has a format_version."""
    try:
        data = json.loads((Path(directory) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data


def foreign_entries(directory: Path) -> list[str]:
    """Entries of a directory that are not files of a fastllm model (sorted; a directory's name ends in /)."""
    foreign = []
    for entry in Path(directory).iterdir():
        if entry.name not in MODEL_FILES or entry.is_symlink() or not entry.is_file():
            foreign.append(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    return sorted(foreign)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def _check_sources(out: Path, sources: Iterable[Path]) -> None:
    resolved = out.resolve()
    for source in sources:
        src = Path(source).resolve()
        if _same(resolved, src):
            raise ExportError(f"OUT {str(out)!r} is the source {str(source)!r}; write to a new directory outside it")
        if any(_same(resolved, parent) for parent in src.parents):
            raise ExportError(f"OUT {str(out)!r} contains the source {str(source)!r}; replacing it would delete the "
                              "source: write to a new directory outside it")
        if any(_same(parent, src) for parent in resolved.parents):
            raise ExportError(f"OUT {str(out)!r} is inside the source {str(source)!r}; write to a directory "
                              "outside it")


def _check_replaceable(out: Path, *, overwrite: bool) -> None:
    """Refuse an existing OUT that is not a directory, or that holds anything this command may not replace."""
    if out.is_symlink():
        raise ExportError(f"OUT {str(out)!r} is a symbolic link to {os.readlink(out)!r}; pass the directory itself "
                          "(or a new path)")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"OUT {str(out)!r} exists and is not a directory; choose another path")
    if not any(out.iterdir()):
        return
    if not is_model_directory(out):
        raise ExportError(f"OUT {str(out)!r} exists, is not empty and is not a fastllm model directory (no "
                          f"{MANIFEST_NAME} with a format_version); --overwrite replaces only a model directory: "
                          "choose another path")
    foreign = foreign_entries(out)
    if foreign:
        raise ExportError(f"OUT {str(out)!r} holds files that are not part of a fastllm model: {', '.join(foreign)}; "
                          "--overwrite would delete them: move them elsewhere or choose another path")
    if not overwrite:
        raise ExportError(f"OUT {str(out)!r} exists and is not empty (a fastllm model); choose another path or pass "
                          "--overwrite to replace it")


def check_destination(out: Path, overwrite: bool, *, sources: Iterable[Path] = ()) -> None:
    """Refuse an OUT that the command must not write: sources are the directories it reads from."""
    out = Path(os.path.abspath(out))
    _check_sources(out, sources)
    _check_replaceable(out, overwrite=overwrite)


def _occupied(out: Path) -> bool:
    return out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir())))


def _remove_model(old: Path) -> None:
    """Delete the replaced model's files one by one; a directory that still holds anything else is kept."""
    for name in MODEL_FILES:
        path = old / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
    try:
        old.rmdir()
    except OSError:
        pass


def commit(tmp: Path, out: Path, *, overwrite: bool = True) -> None:
    """Move the finished directory into place, replacing OUT only now that the new one is complete.

    OUT is re-checked here (it may have changed since the command started): with overwrite False it must still be
    absent or empty."""
    tmp, out = Path(tmp), Path(os.path.abspath(out))
    _check_replaceable(out, overwrite=overwrite)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(out, old)
        # Re-check the set-aside copy: nothing can add to it by OUT's path any more.
        try:
            _check_replaceable(old, overwrite=True)
        except BaseException:
            os.replace(old, out)
            raise
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the old one back
        raise
    if old is not None:
        _remove_model(old)


@contextmanager
def staging(out: Path, what: str):
    """A temporary directory beside OUT that becomes OUT when the block completes, and vanishes when it fails."""
    out = Path(os.path.abspath(out))
    overwrite = _occupied(out)  # check_destination allowed it; at commit, an OUT that was free must still be free
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        commit(tmp, out, overwrite=overwrite)
    except FastLLMError:
        raise
    except Exception as e:
        raise ExportError(f"{what} failed: {type(e).__name__}: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
