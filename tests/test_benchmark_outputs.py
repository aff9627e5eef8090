"""Where the benchmark scripts write: --json and logs are checked first and never written through a link."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import outputs  # noqa: E402  (benchmarks/outputs.py)


@pytest.fixture
def place(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "earlier.json").write_text('{"rows": []}')
    (tmp_path / "link.json").symlink_to(tmp_path / "thesis.tex")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    (tmp_path / "a-dir").mkdir()
    return tmp_path


@pytest.mark.parametrize("name, refusal", [
    ("", "is not a file name"),
    (".", "is not a file name"),
    ("thesis.tex", "does not hold JSON"),
    ("link.json", "is a symbolic link"),
    ("dangling.json", "is a symbolic link"),
    ("a-dir", "is not a regular file"),
    ("thesis.tex/x.json", "is not a directory"),
    ("missing/x.json", "is not a directory"),
    ("two\nlines/x.json", "two\\\\nlines is not a directory"),  # one line, the newline escaped
])
def test_a_json_path_that_is_not_a_new_file_or_an_earlier_result_is_refused(place, monkeypatch, name, refusal):
    monkeypatch.chdir(place)
    with pytest.raises(argparse.ArgumentTypeError, match=refusal):
        outputs.json_path(name)
    assert (place / "thesis.tex").read_text() == "years of work"


def test_a_new_file_or_an_earlier_result_is_written_whole(place):
    import os

    victim = place / "thesis.tex"
    for guess in (f".partial-{os.getpid()}-new.json", f".new.json.{os.getpid()}.partial"):  # names a writer might pick
        (place / guess).symlink_to(victim)
    for name in ("new.json", "earlier.json"):
        path = outputs.json_path(str(place / name))
        outputs.write_json(path, {"rows": [1, 2]})
        assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert victim.read_text() == "years of work" and not (place / "new.json").is_symlink()
    assert [p.name for p in place.iterdir() if ".partial" in p.name and not p.is_symlink()] == []


def test_a_log_is_never_opened_through_a_link(place):
    with pytest.raises(OSError, match="symbolic link"):
        outputs.open_log(place / "link.json")
    assert (place / "thesis.tex").read_text() == "years of work"
    with outputs.open_log(place / "run.log") as log:
        log.write("line\n")
    assert (place / "run.log").read_text() == "line\n"
