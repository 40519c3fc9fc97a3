"""GetCourse's answer cache (a unit of the course service): answers expire after the TTL,
a write drops them, and an answer read before a write is not kept after it."""

from __future__ import annotations

from services.course.read_cache import LIMIT, ReadCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_answers_expire_after_the_ttl() -> None:
    clock = Clock()
    cache: ReadCache[str] = ReadCache(1.0, clock=clock)
    cache.put("c", "answer", cache.mark())
    clock.now += 0.9
    assert cache.get("c") == "answer"
    clock.now += 0.2
    assert cache.get("c") is None


def test_a_write_drops_the_answer_and_a_read_begun_before_it_is_not_kept() -> None:
    cache: ReadCache[str] = ReadCache(10.0, clock=Clock())
    cache.put("c", "old", cache.mark())
    cache.forget("c")
    assert cache.get("c") is None
    mark = cache.mark()  # a read begins ...
    cache.forget("c")  # ... a write commits meanwhile ...
    cache.put("c", "maybe old", mark)  # ... the read's answer is not kept
    assert cache.get("c") is None
    cache.put("c", "new", cache.mark())
    cache.clear()
    assert cache.get("c") is None


def test_off_with_ttl_zero_and_bounded() -> None:
    off: ReadCache[str] = ReadCache(0.0)
    off.put("c", "answer", off.mark())
    assert off.get("c") is None
    cache: ReadCache[int] = ReadCache(10.0, clock=Clock())
    for i in range(LIMIT + 10):
        cache.put(str(i), i, cache.mark())
    assert cache.get(str(LIMIT + 9)) == LIMIT + 9
    assert cache.get("0") is None
    assert len(cache._answers) <= LIMIT
