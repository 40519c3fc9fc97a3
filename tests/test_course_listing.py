"""ListCourses over real channels on SQLite and PostgreSQL: every order_by and filter pages
through a seeded catalogue without a duplicate or a gap while courses are inserted between
pages; page tokens are bound to their query; full-text search finds the same courses on
both databases, title matches first; a page asks the user service once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from learnmesh.course.v1 import course_pb2
from tests.conftest import Mesh
from tests.support.courses import Account, account, course_mesh, courses, create_course
from tests.support.status import refused, violations

TOPICS = ("Algebra", "Biology", "Chemistry")
CATEGORIES = ("Science", "Maths")
LEVELS = (course_pb2.LEVEL_BEGINNER, course_pb2.LEVEL_INTERMEDIATE, course_pb2.LEVEL_ADVANCED)
SEEDED = 36
# The search corpus: (title, description); the same on both databases.
CORPUS = {
    "garden-1": ("Gardening for beginners", "Grow vegetables and flowers in a small plot."),
    "python-1": ("Advanced Python programming", "Decorators, generators and the event loop."),
    "pasta": ("Cooking Italian pasta", "Fresh pasta, sauces and a little gardening of herbs."),
    "python-2": ("Python for data science", "Analyse data with pandas and plot it nicely."),
    "rome": ("The history of Rome", "From the founding of the city to the fall of the empire."),
    "garden-2": ("Herb garden design", "Plan beds of basil, thyme and rosemary for cooks."),
}


@dataclass
class Catalogue:
    mesh: Mesh
    teachers: list[Account]
    seeded: dict[str, course_pb2.Course]
    corpus: dict[str, str]  # corpus key -> course id
    inserted: set[str]


def seeded_title(i: int) -> str:
    if i % 6 == 0:
        return "Shared title for ties"  # several courses, one title: the id breaks the tie
    word = "course" if i % 2 == 0 else "class"
    return f"{TOPICS[i % 3]} {word} {i:02d}"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
async def catalogue(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Catalogue]:
    tmp = tmp_path_factory.mktemp(f"listing-{request.param}")
    async for mesh in course_mesh(request.param, tmp):
        teachers = [await account(mesh, f"Teacher {n}", role="instructor") for n in "ABC"]
        seeded = {}
        for i in range(SEEDED):
            description = (
                "A class about many things, described at some length."
                if i % 2 == 0
                else "A course about many things, described at some length."
            )
            course = await create_course(
                mesh,
                teachers[i % 3],
                seeded_title(i),
                description,
                category=CATEGORIES[i % 2],
                level=LEVELS[i % 3],
            )
            seeded[course.id] = course
        students = [await account(mesh) for _ in range(3)]
        for n, course_id in enumerate(list(seeded)[::5]):
            for student in students[: n % 4]:
                await courses(mesh).Enroll(
                    course_pb2.EnrollRequest(course_id=course_id), metadata=student.metadata
                )
        corpus = {}
        for key, (title, description) in CORPUS.items():
            course = await create_course(
                mesh, teachers[0], title, description, category="Corpus", level=LEVELS[0]
            )
            corpus[key] = course.id
        yield Catalogue(mesh, teachers, seeded, corpus, set())


def key_of(order_by: str) -> tuple[Callable[[course_pb2.Course], Any], bool]:
    """The sort key and direction each order_by promises (ties broken by id)."""
    if order_by == "title":
        return (lambda c: (c.title.lower(), c.id)), False
    if order_by == "created_at":
        return (lambda c: (c.created_at.ToNanoseconds(), c.id)), False
    if order_by == "enrollment_count desc":
        return (lambda c: (c.enrollment_count, c.id)), True
    return (lambda c: (c.created_at.ToNanoseconds(), c.id)), True


async def page_through(
    cat: Catalogue, request: course_pb2.ListCoursesRequest, insert: bool = True
) -> list[course_pb2.Course]:
    """Every page of ``request`` (7 per page), a matching course inserted after each."""
    stub = courses(cat.mesh)
    seen: list[course_pb2.Course] = []
    token = ""
    pages = 0
    while True:
        request.page_token = token
        page = await stub.ListCourses(request)
        seen.extend(page.courses)
        pages += 1
        assert pages < 50, "paging does not end"
        if insert:
            new = await create_course(
                cat.mesh,
                cat.teachers[1],
                f"Inserted course {len(cat.inserted):03d}",
                "A course about many things, inserted while paging.",
                category=request.category or "Science",
                level=request.level or LEVELS[0],
            )
            cat.inserted.add(new.id)
        if not page.next_page_token:
            return seen
        token = page.next_page_token


FILTERS = [
    {},
    {"category": "Science"},
    {"level": course_pb2.LEVEL_INTERMEDIATE},
    {"category": "Maths", "level": course_pb2.LEVEL_ADVANCED},
]


@pytest.mark.parametrize(
    "order_by", ["", "created_at desc", "created_at", "title", "enrollment_count desc"]
)
@pytest.mark.parametrize("filters", FILTERS, ids=["all", "category", "level", "both"])
async def test_every_order_and_filter_pages_without_duplicate_or_gap(
    catalogue: Catalogue, order_by: str, filters: dict[str, Any]
) -> None:
    request = course_pb2.ListCoursesRequest(page_size=7, order_by=order_by, **filters)
    seen = await page_through(catalogue, request)
    ids = [c.id for c in seen]
    assert len(ids) == len(set(ids)), "a course came twice"
    wanted = {
        cid
        for cid, c in catalogue.seeded.items()
        if (not request.category or c.category == request.category)
        and (not request.level or c.level == request.level)
    }
    assert wanted <= set(ids), f"{len(wanted - set(ids))} seeded courses never came"
    assert set(ids) - wanted <= catalogue.inserted | set(catalogue.corpus.values())
    key, descending = key_of(order_by)
    keys = [key(c) for c in seen if c.id in wanted]
    assert keys == sorted(keys, reverse=descending)
    for c in seen:
        assert not request.category or c.category == request.category
        assert not request.level or c.level == request.level


async def test_search_pages_by_relevance_without_duplicate_or_gap(catalogue: Catalogue) -> None:
    request = course_pb2.ListCoursesRequest(page_size=5, search="course")
    seen = await page_through(catalogue, request)
    ids = [c.id for c in seen]
    assert len(ids) == len(set(ids))
    wanted = {
        cid
        for cid, c in catalogue.seeded.items()
        if "course" in c.title.lower() or "course" in c.description.lower()
    }
    assert wanted <= set(ids)
    assert set(ids) - wanted <= catalogue.inserted
    assert any("course" not in c.title.lower() for c in seen)  # both tiers are there
    # Title matches first, then the rest, each newest first.
    tiers = [1 if ("course" in c.title.lower()) else 2 for c in seen]
    assert tiers == sorted(tiers)
    for tier in (1, 2):
        stamps = [
            c.created_at.ToNanoseconds() for c, t in zip(seen, tiers, strict=True) if t == tier
        ]
        assert stamps == sorted(stamps, reverse=True)


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("garden", ["garden-2", "garden-1", "pasta"]),  # titles first (newest first), then text
        ("gardening", ["garden-2", "garden-1", "pasta"]),  # stemmed alike
        ("python", ["python-2", "python-1"]),
        ("programming python", ["python-1"]),  # every word must match
        ("Pasta SAUCES", ["pasta"]),
        ("the empire", ["rome"]),  # "the" is a stop word
        ("Rome's history", ["rome"]),
        ("xylophone", []),
        ("the of and", []),  # only stop words: nothing to look for
        ('"python" OR pasta*', []),  # operators are words, not syntax: "or" is a stop word
    ],
)
async def test_search_finds_the_same_courses_on_both_databases(
    catalogue: Catalogue, search: str, expected: list[str]
) -> None:
    found = await courses(catalogue.mesh).ListCourses(
        course_pb2.ListCoursesRequest(search=search, category="Corpus", page_size=100)
    )
    by_id = {v: k for k, v in catalogue.corpus.items()}
    assert [by_id[c.id] for c in found.courses] == expected


async def test_a_page_token_works_only_for_its_own_query(catalogue: Catalogue) -> None:
    stub = courses(catalogue.mesh)
    first = await stub.ListCourses(course_pb2.ListCoursesRequest(page_size=3, category="Science"))
    token = first.next_page_token
    assert token
    for other in (
        course_pb2.ListCoursesRequest(page_size=3, category="Maths", page_token=token),
        course_pb2.ListCoursesRequest(page_size=3, category="science ", page_token=token),
        course_pb2.ListCoursesRequest(
            page_size=3, category="Science", order_by="title", page_token=token
        ),
        course_pb2.ListCoursesRequest(
            page_size=3, category="Science", search="course", page_token=token
        ),
        course_pb2.ListCoursesRequest(page_size=3, page_token=token),
        course_pb2.ListCoursesRequest(
            page_size=3, category="Science", page_token=token[:-2] + "AA"
        ),
        course_pb2.ListCoursesRequest(page_size=3, category="Science", page_token="A" + token),
    ):
        err = await refused(stub.ListCourses(other), grpc.StatusCode.INVALID_ARGUMENT)
        assert "page_token" in violations(err)
    # The page size may change between pages; the token stays good.
    more = await stub.ListCourses(
        course_pb2.ListCoursesRequest(page_size=10, category="Science", page_token=token)
    )
    assert not {c.id for c in more.courses} & {c.id for c in first.courses}


def batch_get_calls() -> float:
    """BatchGetUsers calls the user service's server has started (its gRPC metrics)."""
    labels = {
        "grpc_type": "unary",
        "grpc_service": "learnmesh.user.v1.UserService",
        "grpc_method": "BatchGetUsers",
    }
    return REGISTRY.get_sample_value("grpc_server_started_total", labels) or 0.0


async def test_a_page_asks_the_user_service_once(catalogue: Catalogue) -> None:
    instructors = catalogue.mesh.server.servicers["course"].catalogue.instructors
    instructors._recent.clear()  # forget what the process knows: every name is due
    before = batch_get_calls()
    oldest = course_pb2.ListCoursesRequest(page_size=30, order_by="created_at")
    page = await courses(catalogue.mesh).ListCourses(oldest)
    assert len({c.instructor.id for c in page.courses}) == 3
    assert batch_get_calls() - before == 1
    assert all(c.instructor.display_name.startswith("Teacher ") for c in page.courses)
    assert not any(c.instructor.stale for c in page.courses)
    await courses(catalogue.mesh).ListCourses(oldest)
    # Within the TTL, with the channel connected: no second question.
    assert batch_get_calls() - before == 1
