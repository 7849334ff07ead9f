"""The project's text: the pydoc topics (Python's reference documentation) and the docstrings of the standard
library, read from this Python's own files. Nothing is downloaded and nothing is copied into the repository.
The bundled model trains on it (train/), quantization measures quality on its held-out split and calibrates mixed
precision on its training split (export/).

Documents are split into train and held-out by a hash of their name, so the split is the same on every machine
that has the same documents (the Python version and the corpus hash are recorded with the model).
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_EVERY = 20  # one document in 20 (by name hash) is held out
SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str

    @property
    def held_out(self) -> bool:
        return zlib.crc32(self.name.encode()) % HELD_OUT_EVERY == 0


def pydoc_topics() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{key}", topics[key]) for key in sorted(topics)]


def docstrings(root: Path | None = None, min_chars: int = 200) -> list[Document]:
    """Module, class and function docstrings of the standard library, one document per source file."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    parts.append(doc.strip())
        text = "\n\n".join(parts)
        if len(text) >= min_chars:
            docs.append(Document(f"stdlib:{rel.as_posix()}", text))
    return docs


def documents() -> list[Document]:
    return pydoc_topics() + docstrings()


def split() -> tuple[list[str], list[str]]:
    """(train texts, held-out texts)."""
    docs = documents()
    return [d.text for d in docs if not d.held_out], [d.text for d in docs if d.held_out]


def held_out_text() -> str:
    return "\n\n".join(split()[1])


def fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
