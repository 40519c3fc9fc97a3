"""Measures the CourseService with a seeded catalogue of 100,000 courses on PostgreSQL.

    python -m benchmarks.course [--courses 100000] [--samples 300] [--rounds 10]

The service runs as an operator runs it: its own process (``benchmarks.servers
full-course``: the product's chain in front of the real auth, user and course services)
on a scratch PostgreSQL database made for the run (on the server of
LEARNMESH_BENCH_POSTGRES_URL) and dropped at the end, even when interrupted. Instructors
are registered through AuthService.Register, so the user service knows them and pages
carry their names (BatchGetUsers); the courses themselves are seeded by SQL (COPY into
``course_courses`` once the service has migrated), since 100,000 CreateCourse calls would
take minutes. Then, from this process over a real channel, sequential calls after a
warm-up: ListCourses' first page, its page 500 (reached once by following tokens, then
asked again and again with the same token) in three orders, and searches; and GetCourse
throughput against the bare grpc.aio server with h2load, paired as benchmarks.run pairs
its runs. The figures go between the ``course`` markers of README.md and
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

import asyncpg
import grpc
from grpc import aio

from benchmarks import h2load
from benchmarks.run import measure, servers, write
from benchmarks.servers import COURSE_DATABASE_ENV
from learnmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from learnmesh.course.v1 import course_pb2, course_pb2_grpc

POSTGRES_URL = os.environ.get(
    "LEARNMESH_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1/test"
)
PAGE_SIZE = 20
DEEP_PAGE = 500
TARGET_DEEP_RATIO = 1.5  # page 500's p50 at most this multiple of page 1's
TARGET_SEARCH_P99_MS = 50.0
TARGET_GET_RATIO = 0.5  # GetCourse on the full chain against the bare server
ORDERS = ("", "title", "enrollment_count desc")
# One and two words; the match counts are printed and reported (a few hundred to thousands).
SEARCHES = ("watercolor", "python", "sourdough bread", "data visualization")
# A word in about one course in eight, measured apart from the target's mix: ranking
# orders every match, so this shows where search time grows with the match count.
BROAD_SEARCH = "projects"
LIST_PROBE = ("/learnmesh.course.v1.CourseService/ListCourses", course_pb2.ListCoursesRequest())

# --- the catalogue: varied titles and descriptions from a few hundred words ---


def _words(text: str, sep: str | None = None) -> list[str]:
    """Word lists written as text (long lists read better so)."""
    return text.split(sep)


# Category -> its subject words, most common first (drawn with Zipf-like weights).
SUBJECTS = {
    "Programming": "python javascript rust golang typescript testing concurrency databases "
    "algorithms compilers debugging refactoring microservices kubernetes docker linux git "
    "networking security webassembly haskell erlang kotlin swift graphql",
    "Data Science": "data statistics visualization pandas regression learning machine neural "
    "networks forecasting clustering sql spreadsheets probability bayesian dashboards "
    "experiments sampling inference notebooks features pipelines tensors embeddings anomalies",
    "Design": "typography layout color branding logos interfaces prototyping accessibility "
    "illustration icons grids motion wireframes usability portfolios posters packaging "
    "signage figma sketching storyboards mockups palettes kerning",
    "Business": "management leadership strategy negotiation startups accounting sales "
    "operations hiring budgeting pitching contracts meetings teams feedback presentations "
    "entrepreneurship franchising logistics procurement ethics consulting mentoring delegation",
    "Music": "guitar piano singing songwriting harmony rhythm drums production mixing "
    "mastering jazz blues chords scales composition orchestration ukulele violin synthesizers "
    "improvisation ear sightreading recording cello",
    "Photography": "portraits lighting landscapes composition editing lightroom exposure "
    "lenses street wildlife studio flash macro astrophotography film darkroom weddings "
    "product drones timelapse panoramas retouching architecture travel",
    "Languages": "spanish french japanese german italian mandarin korean portuguese grammar "
    "vocabulary pronunciation conversation writing reading arabic russian dutch swedish "
    "greek latin hindi idioms listening translation",
    "Mathematics": "calculus algebra geometry trigonometry statistics topology proofs "
    "combinatorics graphs matrices logic number theory optimization differential equations "
    "analysis sets vectors series limits integrals fractals",
    "Cooking": "baking bread pasta knife sauces vegetarian grilling pastry sourdough curry "
    "fermentation soups desserts sushi noodles dumplings spices chocolate cheese pickling "
    "barbecue salads brunch coffee",
    "Art": "drawing painting acrylic oil sketching anatomy perspective charcoal pastel "
    "sculpture ceramics printmaking calligraphy collage murals portraiture shading gouache "
    "ink linocut pottery mosaic watercolor embroidery weaving",
    "Health": "yoga nutrition running meditation strength mobility sleep stretching pilates "
    "cycling swimming posture breathing recovery mindfulness hiking marathon balance "
    "endurance kettlebells rowing boxing climbing dance",
    "Marketing": "seo advertising copywriting email social analytics content branding "
    "campaigns funnels newsletters video podcasts influencers retention pricing surveys "
    "personas community events sponsorship affiliates landing pages",
}
MODIFIERS = _words(
    "Practical Modern Complete Essential Applied Hands-on Advanced Beginner's Intermediate "
    "Creative Professional Effective Fast Fundamental Mastering Everyday Deep Gentle Bold "
    "Simple Confident Real-World Serious Playful Focused Productive Weekend Thirty-Day"
)
GOALS = _words(
    "from Scratch|in Practice|for Beginners|for Professionals|Step by Step|Made Simple|"
    "the Right Way|in Depth|for Busy People|Bootcamp|Masterclass|Workshop|Crash Course|"
    "Fundamentals|Essentials|Projects|Deep Dive|Explained|Toolkit|Field Guide",
    "|",
)
VERBS = _words(
    "build understand practise master explore design plan measure improve review compare "
    "combine sketch shape test ship refine organise teach present analyse"
)
NOUNS = _words(
    "projects exercises quizzes examples habits techniques patterns tools routines "
    "assignments walkthroughs challenges worksheets checklists demonstrations recipes "
    "sessions drills templates critiques"
)
SENTENCES = (
    "Learn {a} and {b} through {n} hands-on {x}.",
    "This {level} course covers {a}, {b} and {c}, with {x} you can reuse at work.",
    "You will {v} {a} step by step, then {w} {b} on {x} of your own.",
    "Each week brings new {x} on {a}; by the end you can {v} {c} with confidence.",
    "We start with {a}, move on to {b}, and finish with a capstone on {c}.",
    "Short videos, {x} and honest feedback help you {v} {b} without the usual frustration.",
    "Ideal if you already know some {a} and want to {w} {c} properly.",
)
FIRST = _words(
    "Ada Grace Alan Edsger Barbara Donald Margaret Linus Guido Ken Dennis Frances Radia "
    "Hedy Katherine Tim Sophie Ines Mateo Amara Kenji Priya Lars Olu Zofia Chen"
)
LAST = _words(
    "Lovelace Hopper Turing Dijkstra Liskov Knuth Hamilton Torvalds Rossum Thompson Ritchie "
    "Allen Perlman Lamarr Johnson Berners-Lee Wilson Moreau Silva Okafor Tanaka Sharma "
    "Nilsson Adeyemi Nowak Wei"
)
LEVELS = ("beginner", "intermediate", "advanced")
COLUMNS = (
    "id",
    "instructor_id",
    "title",
    "title_key",
    "description",
    "category",
    "category_key",
    "level",
    "lesson_count",
    "enrollment_count",
    "archived_at",
    "created_at",
    "updated_at",
)


def _zipf(words: list[str]) -> list[float]:
    return [1 / (rank + 1) for rank in range(len(words))]


def _distinct(rng: random.Random, words: list[str], weights: list[float], k: int) -> list[str]:
    """``k`` different words, drawn by weight (no title says "Drawing and Drawing")."""
    found: list[str] = []
    while len(found) < k:
        word = rng.choices(words, weights)[0]
        if word not in found:
            found.append(word)
    return found


def catalogue(
    count: int, instructors: list[str], seed: int = 10, now: datetime | None = None
) -> Iterator[tuple[Any, ...]]:
    """``count`` course rows in COLUMNS' order, the same for the same seed: one of the
    categories each, words of it drawn most-common-first, created over the three years
    before ``now``."""
    rng = random.Random(seed)
    now = datetime.now(UTC) if now is None else now
    span = timedelta(days=3 * 365)
    categories = list(SUBJECTS)
    words = {c: SUBJECTS[c].split() for c in categories}
    weights = {c: _zipf(words[c]) for c in categories}
    for _ in range(count):
        category = rng.choice(categories)
        a, b, c, d = _distinct(rng, words[category], weights[category], 4)
        form = rng.randrange(4)
        if form == 0:
            title = f"{rng.choice(MODIFIERS)} {a.title()} {rng.choice(GOALS)}"
        elif form == 1:
            title = f"{a.title()} and {b.title()} {rng.choice(GOALS)}"
        elif form == 2:
            title = f"Introduction to {a.title()} {b.title()}"
        else:
            title = f"{rng.choice(MODIFIERS)} {a.title()}: {b.title()} {rng.choice(GOALS)}"
        level = rng.choice(LEVELS)
        description = " ".join(
            template.format(
                a=a,
                b=c,
                c=d,
                n=rng.randint(3, 40),
                x=rng.choice(NOUNS),
                v=rng.choice(VERBS),
                w=rng.choice(VERBS),
                level=level,
            )
            for template in rng.sample(SENTENCES, rng.randint(2, 4))
        )
        created = now - span + span * rng.random()
        updated = min(now, created + timedelta(days=30 * rng.random()))
        # Skewed like a real catalogue: most courses have a few students, some thousands.
        enrolled = min(int(rng.paretovariate(1.1) * 3) - 3, 50_000)
        yield (
            str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            rng.choice(instructors),
            title[:200],
            title[:200].lower(),
            description,
            category,
            category.lower(),
            level,
            rng.randint(4, 40),
            enrolled,
            None,
            created,
            updated,
        )


# --- the scratch database and the service's process ---


def _url(database: str) -> str:
    return f"{POSTGRES_URL.rsplit('/', 1)[0]}/{database}"


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextmanager
def scratch_database() -> Iterator[str]:
    """A new database's URL; the database is dropped afterwards, however this ends."""
    name = f"learnmesh_bench_course_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _url(name)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the processes stop and the database is dropped."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


# --- seeding ---


async def register_instructors(address: str, count: int) -> list[str]:
    """Real users, through AuthService.Register: the user service knows their names."""
    rng = random.Random(7)
    ids = []
    async with aio.insecure_channel(address) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        for number in range(count):
            reply = await auth.Register(
                auth_pb2.RegisterRequest(
                    email=f"instructor-{number}-{uuid.uuid4().hex[:6]}@example.com",
                    password="benchmark password",
                    display_name=f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                    accepted_terms=True,
                ),
                timeout=10,
            )
            ids.append(reply.user.id)
    return ids


async def seed(url: str, rows: list[tuple[Any, ...]]) -> None:
    """COPY into the migrated table (seq and the search vectors are the database's), then
    ANALYZE so the planner knows the table's size."""
    connection = await asyncpg.connect(url)
    try:
        await connection.copy_records_to_table("course_courses", records=rows, columns=COLUMNS)
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


async def matches(url: str, words: str) -> int:
    """How many catalogue courses a search for ``words`` finds."""
    connection = await asyncpg.connect(url)
    try:
        found: int = await connection.fetchval(
            "SELECT count(*) FROM course_courses WHERE archived_at IS NULL "
            "AND search_vector @@ plainto_tsquery('english', $1)",
            words,
        )
        return found
    finally:
        await connection.close()


# --- latency, sequential calls from outside ---


@dataclass(frozen=True)
class Latency:
    samples: list[float]  # milliseconds

    def quantile(self, q: int) -> float:
        return statistics.quantiles(self.samples, n=100, method="inclusive")[q - 1]

    @property
    def p50(self) -> float:
        return self.quantile(50)

    @property
    def p99(self) -> float:
        return self.quantile(99)


async def timed(
    call: Callable[..., Awaitable[Any]], request: Any, samples: int, warmup: int
) -> Latency:
    """``samples`` sequential calls of the same request after ``warmup`` untimed ones; any
    non-OK status raises (grpc.RpcError), so every timed call was answered OK."""
    for _ in range(warmup):
        await call(request, timeout=10)
    found = []
    for _ in range(samples):
        began = time.perf_counter()
        await call(request, timeout=10)
        found.append((time.perf_counter() - began) * 1000)
    return Latency(found)


async def deep_token(stub: Any, order_by: str) -> str:
    """The page token of page DEEP_PAGE, by following next_page_token from the first."""
    token = ""
    for page in range(1, DEEP_PAGE):
        reply = await stub.ListCourses(
            course_pb2.ListCoursesRequest(page_size=PAGE_SIZE, order_by=order_by, page_token=token),
            timeout=10,
        )
        token = reply.next_page_token
        if not token:
            raise RuntimeError(f"order {order_by!r}: no page after {page}")
    return token


async def check_names(stub: Any) -> None:
    """Pages carry the instructors' names from the user service (not stale, not empty)."""
    reply = await stub.ListCourses(course_pb2.ListCoursesRequest(page_size=PAGE_SIZE), timeout=10)
    missing = [c.id for c in reply.courses if c.instructor.stale or not c.instructor.display_name]
    if len(reply.courses) != PAGE_SIZE or missing:
        raise RuntimeError(f"first page: {len(reply.courses)} courses, no name for {missing}")


Latencies = dict[str, Latency]


async def latencies(address: str, samples: int, warmup: int) -> Latencies:
    found: Latencies = {}
    async with aio.insecure_channel(address) as channel:
        stub = course_pb2_grpc.CourseServiceStub(channel)
        await check_names(stub)
        for order_by in ORDERS:
            first = course_pb2.ListCoursesRequest(page_size=PAGE_SIZE, order_by=order_by)
            found[f"first {order_by}"] = await timed(stub.ListCourses, first, samples, warmup)
            deep = course_pb2.ListCoursesRequest(
                page_size=PAGE_SIZE, order_by=order_by, page_token=await deep_token(stub, order_by)
            )
            found[f"deep {order_by}"] = await timed(stub.ListCourses, deep, samples, warmup)
            print(
                f"order {order_by or 'default'!r}: page 1 p50 {found[f'first {order_by}'].p50:.1f}"
                f" ms, page {DEEP_PAGE} p50 {found[f'deep {order_by}'].p50:.1f} ms",
                flush=True,
            )
        for words in (*SEARCHES, BROAD_SEARCH):
            request = course_pb2.ListCoursesRequest(page_size=PAGE_SIZE, search=words)
            found[f"search {words}"] = await timed(stub.ListCourses, request, samples, warmup)
            print(f"search {words!r}: p99 {found[f'search {words}'].p99:.1f} ms", flush=True)
    return found


async def some_course(address: str) -> str:
    """A seeded course's id (the 100th newest: a real row, not the hottest)."""
    async with aio.insecure_channel(address) as channel:
        stub = course_pb2_grpc.CourseServiceStub(channel)
        reply = await stub.ListCourses(course_pb2.ListCoursesRequest(page_size=100), timeout=10)
        course_id: str = reply.courses[-1].id
        return course_id


# --- throughput: GetCourse, paired with the bare server ---

Pairs = list[tuple[float, float]]  # (full-course calls/s, bare calls/s) per round


def throughput(env: dict[str, str], course_id: str, load: h2load.Load, rounds: int) -> Pairs:
    """Each round starts both servers afresh and measures GetCourse on each, right next
    to each other, the order flipped every other round (as benchmarks.run does)."""
    target = (
        "/learnmesh.course.v1.CourseService/GetCourse",
        course_pb2.GetCourseRequest(course_id=course_id),
    )
    pairs: Pairs = []
    for number in range(rounds):
        with servers(("bare", "full-course"), env=env, probe=target) as addresses:
            order = ["full-course", "bare"] if number % 2 == 0 else ["bare", "full-course"]
            rates = {config: measure(addresses[config], target, load) for config in order}
        pairs.append((rates["full-course"], rates["bare"]))
        print(
            f"round {number + 1}: GetCourse {rates['full-course']:,.0f}/s, "
            f"bare {rates['bare']:,.0f}/s",
            flush=True,
        )
    return pairs


# --- the report ---


def report(
    found: Latencies,
    counts: dict[str, int],
    pairs: Pairs,
    load: h2load.Load,
    courses: int,
    instructors: int,
    seconds_seeding: float,
) -> str:
    def held(ok: bool) -> str:
        return "yes" if ok else "**no**"

    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}, PostgreSQL; "
        f"`python -m benchmarks.course`: {courses:,} courses from {instructors} instructors "
        f"(seeded by COPY in {seconds_seeding:.0f} s), page size {PAGE_SIZE}, sequential calls "
        f"over one channel, {len(found[f'first {ORDERS[0]}'].samples)} timed calls each.",
        "",
        "| call | p50 ms | p99 ms |",
        "|---|---:|---:|",
    ]
    for order_by in ORDERS:
        label = f"order_by {order_by!r}" if order_by else "default order (newest first)"
        first, deep = found[f"first {order_by}"], found[f"deep {order_by}"]
        lines.append(f"| ListCourses page 1, {label} | {first.p50:.1f} | {first.p99:.1f} |")
        lines.append(f"| ListCourses page {DEEP_PAGE}, {label} | {deep.p50:.1f} | {deep.p99:.1f} |")
    searched = [found[f"search {w}"] for w in SEARCHES]
    for words, latency in zip(SEARCHES, searched, strict=True):
        lines.append(
            f"| search {words!r} ({counts[words]:,} matches) | {latency.p50:.1f} "
            f"| {latency.p99:.1f} |"
        )
    every = Latency([s for latency in searched for s in latency.samples])
    lines.append(f"| all four searches above | {every.p50:.1f} | {every.p99:.1f} |")
    broad = found[f"search {BROAD_SEARCH}"]
    lines.append(
        f"| search {BROAD_SEARCH!r} ({counts[BROAD_SEARCH]:,} matches; not in the target's mix) "
        f"| {broad.p50:.1f} | {broad.p99:.1f} |"
    )
    ratios = [full / bare for full, bare in pairs]
    ratio = statistics.median(ratios)
    spread = "-"
    if len(ratios) >= 2:
        low, _, high = statistics.quantiles(ratios, n=4)
        spread = f"{low:.2f}-{high:.2f}"
    lines += [
        "",
        f"GetCourse (a seeded course) with h2load -c {load.clients} -m {load.streams}, "
        f"{load.seconds} s per run, {len(pairs)} rounds, each paired with the bare server: "
        f"{statistics.median(f for f, _ in pairs):,.0f} calls/s on the full chain against "
        f"{statistics.median(b for _, b in pairs):,.0f} bare; ratio {ratio:.2f} "
        f"(quartiles {spread}).",
        "",
        "| target | measured | held |",
        "|---|---|---|",
    ]
    first, deep = found[f"first {ORDERS[0]}"], found[f"deep {ORDERS[0]}"]
    deep_ratio = deep.p50 / first.p50
    lines.append(
        f"| page {DEEP_PAGE} within {TARGET_DEEP_RATIO}x of page 1 (p50, default order) "
        f"| {deep_ratio:.2f}x ({deep.p50:.1f} / {first.p50:.1f} ms) "
        f"| {held(deep_ratio <= TARGET_DEEP_RATIO)} |"
    )
    for order_by in ORDERS[1:]:
        one, far = found[f"first {order_by}"], found[f"deep {order_by}"]
        lines.append(
            f"| the same, order_by {order_by!r} | {far.p50 / one.p50:.2f}x "
            f"| {held(far.p50 / one.p50 <= TARGET_DEEP_RATIO)} |"
        )
    lines.append(
        f"| search p99 under {TARGET_SEARCH_P99_MS:.0f} ms (the four searches) "
        f"| {every.p99:.1f} ms | {held(every.p99 < TARGET_SEARCH_P99_MS)} |"
    )
    lines.append(
        f"| GetCourse on the full chain >= {TARGET_GET_RATIO}x the bare server | {ratio:.2f}x "
        f"| {held(ratio >= TARGET_GET_RATIO)} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--courses", type=int, default=100_000)
    parser.add_argument("--instructors", type=int, default=40)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the figures only")
    args = parser.parse_args()
    _stop_on_sigterm()
    load = h2load.Load(seconds=args.seconds)
    with scratch_database() as url:
        env = {COURSE_DATABASE_ENV: url}
        with servers(("full-course",), env=env, probe=LIST_PROBE) as addresses:
            address = addresses["full-course"]  # up, so its tables are migrated
            ids = asyncio.run(register_instructors(address, args.instructors))
            began = time.monotonic()
            rows = list(catalogue(args.courses, ids))
            asyncio.run(seed(url, rows))
            seeding = time.monotonic() - began
            print(f"seeded {len(rows):,} courses in {seeding:.1f} s", flush=True)
            counts = {w: asyncio.run(matches(url, w)) for w in (*SEARCHES, BROAD_SEARCH)}
            print(f"matches: {counts}", flush=True)
            found = asyncio.run(latencies(address, args.samples, args.warmup))
            course_id = asyncio.run(some_course(address))
        pairs = throughput(env, course_id, load, args.rounds)
    text = report(found, counts, pairs, load, args.courses, args.instructors, seeding)
    print(text)
    if not args.no_write:
        write(text, tag="course")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
