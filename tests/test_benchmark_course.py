"""benchmarks.course's seed data and report, without running the benchmark: the rows fit
course_courses as the service writes it, and each target says whether it held."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from benchmarks import course, h2load


def test_catalogue_rows_fit_the_table_and_repeat_for_a_seed() -> None:
    now = datetime(2026, 12, 3, tzinfo=UTC)
    rows = list(course.catalogue(2000, ["i-1", "i-2"], now=now))
    assert rows == list(course.catalogue(2000, ["i-1", "i-2"], now=now))
    assert len({r[0] for r in rows}) == len(rows)  # ids unique
    for row in rows:
        values = dict(zip(course.COLUMNS, row, strict=True))
        assert values["title_key"] == values["title"].lower()
        assert values["category_key"] == values["category"].lower()
        assert values["level"] in course.LEVELS
        assert values["archived_at"] is None
        assert values["created_at"] <= values["updated_at"]
        assert 5 <= len(values["title"]) <= 200 and 20 <= len(values["description"]) <= 5000
    words = {w for r in rows for w in re.findall(r"[a-z]+", f"{r[2]} {r[4]}".lower())}
    assert len(words) > 300


def test_report_states_each_target() -> None:
    fast = course.Latency([3.0] * 50)
    slow = course.Latency([3.0] * 40 + [60.0] * 10)
    found = {f"first {o}": fast for o in course.ORDERS}
    found |= {f"deep {o}": fast for o in course.ORDERS}
    found |= {f"search {w}": fast for w in course.SEARCHES}
    found[f"search {course.BROAD_SEARCH}"] = slow
    counts = dict.fromkeys((*course.SEARCHES, course.BROAD_SEARCH), 100)
    text = course.report(found, counts, [(600.0, 6000.0)] * 3, h2load.Load(), 1000, 4, 1.0)
    assert "| search p99 under 50 ms (the four searches) | 3.0 ms | yes |" in text
    assert "| GetCourse on the full chain >= 0.5x the bare server | 0.10x | **no** |" in text
    assert "| page 500 within 1.5x of page 1 (p50, default order) | 1.00x" in text
