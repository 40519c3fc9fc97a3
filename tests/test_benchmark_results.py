"""benchmarks.run writes its figures between the markers of RESULTS.md and README.md and
keeps everything else in both (hand-written notes included). The benchmark is not run."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.run import MARK_BEGIN, MARK_END, RESULTS_HEAD, between_markers, write

NEW = "| configuration | calls/s |\n|---|---:|\n| full chain | 5,000 |"


def sample(root: Path, results: str | None, readme: str) -> None:
    (root / "benchmarks").mkdir()
    if results is not None:
        (root / "benchmarks" / "RESULTS.md").write_text(results)
    (root / "README.md").write_text(readme)


def test_only_the_marked_sections_are_replaced(tmp_path: Path) -> None:
    results = (
        "# Benchmark results\n\nA note by hand: run on a quiet machine.\n\n"
        f"{MARK_BEGIN}\nold figures\n{MARK_END}\n\n## Analysis\n\nWritten by hand.\n"
    )
    readme = f"# learnmesh\n\nIntro.\n\n{MARK_BEGIN}\nold figures\n{MARK_END}\n\nAfter.\n"
    sample(tmp_path, results, readme)
    write(NEW, root=tmp_path)
    assert (tmp_path / "benchmarks" / "RESULTS.md").read_text() == results.replace(
        "old figures", NEW
    )
    assert (tmp_path / "README.md").read_text() == readme.replace("old figures", NEW)

    write("newer", root=tmp_path)  # and again: still one section, still the hand text
    again = (tmp_path / "benchmarks" / "RESULTS.md").read_text()
    assert again == results.replace("old figures", "newer")


def test_results_without_markers_keep_their_text_and_gain_a_section(tmp_path: Path) -> None:
    hand = "# Benchmark results\n\nNotes kept by hand.\n"
    sample(tmp_path, hand, "# learnmesh\n\nNo figures here.\n")
    write(NEW, root=tmp_path)
    found = (tmp_path / "benchmarks" / "RESULTS.md").read_text()
    assert found == f"{hand}\n{MARK_BEGIN}\n{NEW}\n{MARK_END}\n"
    assert (tmp_path / "README.md").read_text() == "# learnmesh\n\nNo figures here.\n"


def test_missing_results_are_made_with_markers(tmp_path: Path) -> None:
    sample(tmp_path, None, "readme\n")
    write(NEW, root=tmp_path)
    found = (tmp_path / "benchmarks" / "RESULTS.md").read_text()
    assert found.startswith(RESULTS_HEAD.rstrip())
    assert found.endswith(f"{MARK_BEGIN}\n{NEW}\n{MARK_END}\n")


@pytest.mark.parametrize(
    "broken",
    [
        f"a\n{MARK_END}\nb\n{MARK_BEGIN}\nc\n",  # end first
        f"a\n{MARK_BEGIN}\nb\n",  # no end
        f"{MARK_BEGIN}\n{MARK_END}\n{MARK_BEGIN}\n{MARK_END}\n",  # twice
    ],
)
def test_broken_markers_change_no_file(tmp_path: Path, broken: str) -> None:
    results = f"# Benchmark results\n\n{MARK_BEGIN}\nold\n{MARK_END}\n"
    sample(tmp_path, results, broken)
    with pytest.raises(ValueError, match="benchmarks:"):
        write(NEW, root=tmp_path)
    assert (tmp_path / "benchmarks" / "RESULTS.md").read_text() == results
    assert (tmp_path / "README.md").read_text() == broken
    with pytest.raises(ValueError, match="benchmarks:"):
        between_markers(broken, NEW)


def test_the_repositorys_files_have_their_markers() -> None:
    root = Path(__file__).resolve().parent.parent
    for path in (root / "benchmarks" / "RESULTS.md", root / "README.md"):
        between_markers(path.read_text(), NEW)  # ValueError unless one pair, in order


def test_each_benchmark_rewrites_only_its_own_markers() -> None:
    events = "<!-- events:begin -->\nold\n<!-- events:end -->\n"
    content = f"{MARK_BEGIN}\nchain figures\n{MARK_END}\n{events}"
    found = between_markers(content, "event figures", tag="events")
    assert found == (
        f"{MARK_BEGIN}\nchain figures\n{MARK_END}\n"
        "<!-- events:begin -->\nevent figures\n<!-- events:end -->\n"
    )
