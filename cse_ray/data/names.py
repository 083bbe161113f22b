"""Image names and list files: the one rule for a safe name, and the one reader and writer of lists.

A name is a file stem inside the dataset's folders, so anything that could escape them ('/', '..') is
refused where a list is read, not when a worker opens the file an hour later.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from cse_ray import artifacts
from cse_ray.errors import UserError


def validate_name(name: str) -> str:
    """Reject names that could escape the dataset folders (path separators, '..', empty)."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"image name {name!r} is empty")
    if "/" in name or "\\" in name or ".." in name or "\x00" in name:
        raise UserError(f"image name {name!r} must not contain '/', '\\', '..' or NUL")
    if name != name.strip():
        raise UserError(f"image name {name!r} has leading or trailing whitespace")
    return name


_PSA_LINE = re.compile(r"^/?JPEGImages/([^/\s]+)\.jpg$")


def read_list(path: str | os.PathLike) -> list[str]:
    """Names from a list file: one NAME per line, or the psa/OC-CSE form
    `/JPEGImages/NAME.jpg /SegmentationClassAug/NAME.png`. Blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: image list file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read image list ({exc})") from None
    names: list[str] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        match = _PSA_LINE.match(tokens[0])
        if match:
            candidate = match.group(1)
        elif len(tokens) == 1:
            candidate = tokens[0]
        else:
            raise UserError(
                f"{path}:{line_number}: expected 'NAME' or '/JPEGImages/NAME.jpg ...', got {line!r}"
            )
        try:
            names.append(validate_name(candidate))
        except UserError as exc:
            raise UserError(f"{path}:{line_number}: {exc}") from None
    return names


def write_list(path: str | os.PathLike, names: Iterable[str]) -> Path:
    """One name per line, written atomically."""
    names = [validate_name(name) for name in names]
    artifacts.write_text(path, "".join(f"{name}\n" for name in names))
    return Path(path)
