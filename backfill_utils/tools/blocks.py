"""Generated blocks of Markdown files: the one writer of every ``<!-- NAME:START -->`` ...
``<!-- NAME:END -->`` block, in README.md and in the pages of ``docs/``.

Which block lives where, and which function writes it:

- ``RESULTS`` (README.md) and ``RESULTS_FULL`` (docs/results.md): :func:`backfill_utils.tools.results_doc.update_readme`
- ``VERDICT`` (README.md) and ``VERDICT_FULL`` (docs/fairness.md): :func:`backfill_utils.tools.report.update_readme`
- ``BENCH`` (docs/protocol.md): :func:`backfill_utils.tools.bench.write_doc_block`
- ``SCALE`` (docs/reproducibility.md): :func:`backfill_utils.tools.scale_cost.write_doc_block`

Everything outside a block stays byte for byte; a block is never edited by hand.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .. import config as C
from ..io import atomic_write_text

__all__ = ["README", "DOCS", "markers", "write_block", "read_block"]

README = C.REPO_ROOT / "README.md"
DOCS = C.REPO_ROOT / "docs"


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of the block ``name``.

    >>> markers("BENCH")
    ('<!-- BENCH:START -->', '<!-- BENCH:END -->')
    """
    if not name or not name.replace("_", "").isalnum() or name.upper() != name:
        raise ValueError(f"a block name is upper-case letters, digits and '_', got {name!r}")
    return f"<!-- {name}:START -->", f"<!-- {name}:END -->"


def _split(path: Path, name: str) -> tuple[str, str, str]:
    start, end = markers(name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: it should hold the generated block {name} "
                                f"({start} ... {end})") from None
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        found = f"{text.count(start)} x {start}, {text.count(end)} x {end}"
        raise ValueError(f"{path} needs exactly one {start} ... {end} block (found {found}); add the two "
                         "markers where the block belongs and run again")
    head, rest = text.split(start, 1)
    body, tail = rest.split(end, 1)
    return head, body, tail


def read_block(path: str | os.PathLike, name: str) -> str:
    """The text between the markers of block ``name`` in ``path`` (an error naming the file
    and the marker if they are not there exactly once)."""
    return _split(Path(path), name)[1].removeprefix("\n")


def write_block(path: str | os.PathLike, name: str, text: str | Callable[[], str]) -> Path:
    r"""Replace the block ``name`` of the file ``path`` with ``text`` (a string, or a function
    giving it, called after the markers are checked), atomically; the rest of the file stays
    byte for byte. An error naming the file and the marker when the file does not hold
    exactly one ``<!-- NAME:START -->`` ... ``<!-- NAME:END -->`` pair.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "R.md"
    >>> _ = p.write_text("a\n<!-- X:START -->\nold\n<!-- X:END -->\nz\n")
    >>> write_block(p, "X", "new").read_text()
    'a\n<!-- X:START -->\nnew\n<!-- X:END -->\nz\n'
    """
    path = Path(path)
    head, _, tail = _split(path, name)
    start, end = markers(name)
    body = text() if callable(text) else text
    if body and not body.endswith("\n"):
        body += "\n"
    return atomic_write_text(path, head + start + "\n" + body + end + tail)
