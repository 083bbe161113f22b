"""Image names and list files: the safe-name rule, the plain and psa list formats, the list writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from cse_ray.data import names as N
from cse_ray.errors import UserError


def test_read_list_accepts_plain_and_psa_formats(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("2007_000032\n\n2007_000039\n")
    psa = tmp_path / "psa.txt"
    psa.write_text(
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
        "/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n\n"
    )
    assert N.read_list(plain) == ["2007_000032", "2007_000039"]
    assert N.read_list(psa) == ["2007_000032", "2007_000039"]


@pytest.mark.parametrize("bad_name", ["a/b", "..", "x..y", "a\\b"])
def test_read_list_rejects_names_that_escape_the_dataset(tmp_path: Path, bad_name: str) -> None:
    path = tmp_path / "bad_list.txt"
    path.write_text(f"ok_name\n{bad_name}\n")
    with pytest.raises(UserError, match=r"bad_list\.txt:2") as info:
        N.read_list(path)
    assert repr(bad_name) in str(info.value) and "must not contain" in str(info.value)


def test_validate_name_rejects_empty_name() -> None:
    with pytest.raises(UserError, match="empty"):
        N.validate_name("")


def test_read_list_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nowhere\.txt.*not found"):
        N.read_list(tmp_path / "nowhere.txt")


def test_write_list_round_trips_and_refuses_unsafe_names(tmp_path: Path) -> None:
    path = N.write_list(tmp_path / "sub" / "out.txt", ["a", "2007_000032"])
    assert path.read_text() == "a\n2007_000032\n" and N.read_list(path) == ["a", "2007_000032"]
    with pytest.raises(UserError, match="must not contain"):
        N.write_list(tmp_path / "bad.txt", ["ok", "../escape"])
    assert not (tmp_path / "bad.txt").exists()

