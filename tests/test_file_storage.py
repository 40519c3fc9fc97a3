"""The file service's storage (services/file/storage.py) on both real backends: a local
directory, and S3 as moto's standalone server answers it (started here on a free port).

Without moto the S3 half skips, except under CI=true where it fails."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from learnmesh import config
from services.file.storage import (
    LocalStorage,
    S3Storage,
    Storage,
    StorageNotFound,
    storage_from_url,
)
from tests.conftest import IN_CI

MiB = 1024 * 1024
BUCKET = "learnmesh-files"


# ---------------------------------------------------------------------------------------
# moto's S3 server


class Moto:
    def __init__(self, url: str) -> None:
        self.url = url

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ALLOW_HTTP": "true",
        }

    def incomplete_uploads(self, prefix: str) -> int:
        """Multipart uploads begun and neither completed nor aborted under prefix."""
        with urllib.request.urlopen(f"{self.url}/{BUCKET}?uploads&prefix={prefix}/") as answer:
            return len(re.findall(rb"<Upload>", answer.read()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}; CI=true requires the S3 tests")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with tempfile.TemporaryFile() as log:
        yield from _run_moto(log)


def _run_moto(log: Any) -> Iterator[Moto]:
    port = _free_port()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    except OSError as exc:
        _unavailable(f"moto's server did not start: {exc}")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                log.seek(0)
                tail = log.read()[-500:].decode(errors="replace")
                _unavailable(f"moto's server exited ({process.returncode}): {tail}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    _unavailable("moto's server did not answer within 30 s")
                time.sleep(0.1)
        created = urllib.request.Request(f"{url}/{BUCKET}", method="PUT")
        with urllib.request.urlopen(created, timeout=5):
            pass
        yield Moto(url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def storage(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    made: Storage
    if backend == "local":
        made = LocalStorage(tmp_path / "files")
    else:
        server: Moto = request.getfixturevalue("moto")
        made = S3Storage(BUCKET, f"t-{uuid.uuid4().hex}", env=server.env())
    yield made
    await made.aclose()


def leftovers(storage: Storage, request: pytest.FixtureRequest) -> list[str]:
    """What a failed put could have left beside the keys: files in .partial/, or
    incomplete multipart uploads."""
    if isinstance(storage, LocalStorage):
        return os.listdir(storage.partial) if storage.partial.exists() else []
    assert isinstance(storage, S3Storage)
    server: Moto = request.getfixturevalue("moto")
    return ["upload"] * server.incomplete_uploads(storage.prefix)


# ---------------------------------------------------------------------------------------
# helpers


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]
        await asyncio.sleep(0)


async def read_all(storage: Storage, key: str, *args: Any, **kwargs: Any) -> bytes:
    return b"".join([chunk async for chunk in storage.read(key, *args, **kwargs)])


def vm_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# ---------------------------------------------------------------------------------------
# the suite, on both backends


async def test_round_trip_of_a_multi_mib_object(storage: Storage) -> None:
    data = os.urandom(7 * MiB + 12345)
    assert await storage.put("owner/file", chunks_of(data, 100_000)) == len(data)
    assert await storage.size("owner/file") == len(data)
    pieces = [chunk async for chunk in storage.read("owner/file", chunk_size=64 * 1024)]
    assert all(0 < len(piece) <= 64 * 1024 for piece in pieces)
    assert hashlib.sha256(b"".join(pieces)).digest() == hashlib.sha256(data).digest()


async def test_many_small_chunks(storage: Storage) -> None:
    data = os.urandom(5000 * 7)
    assert await storage.put("owner/small", chunks_of(data, 7)) == len(data)
    assert await read_all(storage, "owner/small", chunk_size=1000) == data


async def test_ranged_reads(storage: Storage) -> None:
    data = os.urandom(6 * MiB + 7)
    await storage.put("o/ranged", chunks_of(data, MiB))
    n = len(data)
    for start, end in [
        (0, 1),
        (5, 1000),
        (MiB - 3, 3 * MiB + 5),
        (n - 10, None),
        (n - 10, n + 100),
        (n, None),
        (n + 5, n + 10),
        (100, 100),
        (0, None),
    ]:
        got = await read_all(storage, "o/ranged", start, end, chunk_size=300_000)
        assert got == data[start:end], (start, end)
    with pytest.raises(ValueError, match="byte range"):
        storage.read("o/ranged", -1)
    with pytest.raises(ValueError, match="byte range"):
        storage.read("o/ranged", 10, 5)


async def test_an_empty_object(storage: Storage) -> None:
    assert await storage.put("o/empty", chunks_of(b"", 1)) == 0
    assert await storage.size("o/empty") == 0
    assert await read_all(storage, "o/empty") == b""
    assert await storage.keys() == ["o/empty"]


async def test_a_missing_key(storage: Storage) -> None:
    stream = storage.read("o/missing")
    with pytest.raises(StorageNotFound):
        await anext(stream)
    with pytest.raises(StorageNotFound):
        await read_all(storage, "o/missing", 10, 20)
    assert await storage.size("o/missing") is None
    assert await storage.delete("o/missing") is False


async def test_delete_is_idempotent(storage: Storage) -> None:
    await storage.put("o/gone", chunks_of(b"bytes", 2))
    await storage.put("o/kept", chunks_of(b"others", 2))
    assert await storage.delete("o/gone") is True
    assert await storage.delete("o/gone") is False
    assert await storage.size("o/gone") is None
    assert await storage.keys() == ["o/kept"]
    with pytest.raises(StorageNotFound):
        await read_all(storage, "o/gone")


async def test_keys_listing(storage: Storage) -> None:
    for key in ["a/x", "a/y", "ab/w", "b/z", "a/sub/deep"]:
        await storage.put(key, chunks_of(key.encode(), 4))
    assert await storage.keys() == ["a/sub/deep", "a/x", "a/y", "ab/w", "b/z"]
    assert await storage.keys("a/") == ["a/sub/deep", "a/x", "a/y"]
    assert await storage.keys("a") == ["a/sub/deep", "a/x", "a/y", "ab/w"]
    assert await storage.keys("a/s") == ["a/sub/deep"]
    assert await storage.keys("c/") == []
    with pytest.raises(ValueError, match="prefix"):
        await storage.keys("../")


async def test_a_put_whose_chunks_raise_midway_leaves_nothing(
    storage: Storage, request: pytest.FixtureRequest
) -> None:
    old = b"the old version"
    await storage.put("o/kept", chunks_of(old, 4))

    async def failing() -> AsyncIterator[bytes]:
        for _ in range(7):  # past one S3 part
            yield os.urandom(MiB)
        raise RuntimeError("the client went away")

    with pytest.raises(RuntimeError, match="went away"):
        await storage.put("o/new", failing())
    with pytest.raises(RuntimeError, match="went away"):
        await storage.put("o/kept", failing())
    assert await storage.keys() == ["o/kept"]
    assert await storage.size("o/new") is None
    assert await read_all(storage, "o/kept") == old
    assert leftovers(storage, request) == []


async def test_a_put_cancelled_midway_leaves_nothing(
    storage: Storage, request: pytest.FixtureRequest
) -> None:
    halfway = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        for index in range(100):
            if index == 7:  # past one S3 part
                halfway.set()
            yield os.urandom(MiB)
            await asyncio.sleep(0.01)

    put = asyncio.create_task(storage.put("o/cancelled", slow()))
    await asyncio.wait_for(halfway.wait(), 10)
    await asyncio.sleep(0.05)
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert await storage.keys() == []
    assert await storage.size("o/cancelled") is None
    assert leftovers(storage, request) == []


async def test_a_put_cancelled_while_its_chunks_wait_leaves_nothing(
    storage: Storage, request: pytest.FixtureRequest
) -> None:
    """The chunks' source blocks (a client that stops sending) when the put is cancelled."""
    sent = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield os.urandom(MiB)
        sent.set()
        await asyncio.Event().wait()
        yield b"never"

    put = asyncio.create_task(storage.put("o/stalled", stalled()))
    await asyncio.wait_for(sent.wait(), 10)
    await asyncio.sleep(0.2)
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(put, 10)
    assert await storage.keys() == []
    assert leftovers(storage, request) == []


async def test_a_put_cancelled_as_its_chunks_end_leaves_nothing(
    storage: Storage, request: pytest.FixtureRequest
) -> None:
    """The cancellation lands while the object is being committed (the last S3 part and
    the completion, the local fsync and rename) or just before."""
    for attempt in range(3):
        ended = asyncio.Event()

        async def whole(ended: asyncio.Event) -> AsyncIterator[bytes]:
            for _ in range(6):
                yield os.urandom(MiB)
            ended.set()

        put = asyncio.create_task(storage.put(f"o/late{attempt}", whole(ended)))
        await asyncio.wait_for(ended.wait(), 10)
        for _ in range(attempt):
            await asyncio.sleep(0)
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put
        assert await storage.keys() == []
        assert leftovers(storage, request) == []


HOSTILE = [
    "",
    "/",
    "/etc/passwd",
    "a/",
    "/a",
    "a//b",
    "..",
    ".",
    "../x",
    "a/../b",
    "a/./b",
    ".partial/x",
    "a/.hidden",
    "a b",
    "a\n",
    "a\nb",
    "a\x00b",
    "a\\b",
    "C:x",
    "~root",
    "ä",
    "a/b%2F..",
    "a" * 2000,
]


@pytest.mark.parametrize("key", HOSTILE)
async def test_hostile_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError, match="storage key"):
        await storage.put(key, chunks_of(b"x", 1))
    with pytest.raises(ValueError, match="storage key"):
        storage.read(key)
    with pytest.raises(ValueError, match="storage key"):
        await storage.delete(key)
    with pytest.raises(ValueError, match="storage key"):
        await storage.size(key)
    assert await storage.keys() == []


async def test_a_put_of_50_mib_keeps_memory_flat(storage: Storage) -> None:
    block = os.urandom(256 * 1024)
    before = vm_rss()
    highest = before

    async def generated() -> AsyncIterator[bytes]:
        nonlocal highest
        for index in range(200):
            highest = max(highest, vm_rss())
            yield block[index % 7 :] + block[: index % 7]  # a fresh object each time
            await asyncio.sleep(0)

    assert await storage.put("o/big", generated()) == 50 * MiB
    after = vm_rss()
    assert max(highest, after) - before < 20 * MiB, (before, highest, after)

    before = vm_rss()
    total = 0
    async for chunk in storage.read("o/big"):
        total += len(chunk)
        highest = max(highest, vm_rss())
    assert total == 50 * MiB
    assert max(highest, vm_rss()) - before < 20 * MiB


async def test_concurrent_puts_of_different_keys(storage: Storage) -> None:
    contents = {f"owner/{index}": os.urandom(MiB + index * 1000) for index in range(8)}
    written = await asyncio.gather(
        *(storage.put(key, chunks_of(data, 64 * 1024)) for key, data in contents.items())
    )
    assert written == [len(data) for data in contents.values()]
    assert await storage.keys() == sorted(contents)
    for key, data in contents.items():
        assert await read_all(storage, key) == data


async def test_sweep_partial(storage: Storage) -> None:
    await storage.put("o/kept", chunks_of(b"kept", 2))
    if isinstance(storage, S3Storage):
        # Incomplete multipart uploads cannot be listed through obstore: a bucket lifecycle
        # rule expires them (docs/files.md).
        assert await storage.sweep_partial() == 0
    else:
        assert isinstance(storage, LocalStorage)
        gone = _gone_pid()
        host = socket.gethostname().replace("~", "-")
        # A dead process's upload and a day-old file of unknown origin go ...
        (storage.partial / f"{host}~{gone}~0123abcd").write_bytes(b"half an upload")
        stale = storage.partial / "deadbeef"
        stale.write_bytes(b"")
        os.utime(stale, (time.time() - 2 * 24 * 3600,) * 2)
        # ... a live process's upload (another replica's), another host's and a fresh
        # file of unknown origin stay.
        live = [f"{host}~{os.getppid()}~live", f"elsewhere~{gone}~theirs", "fresh"]
        for name in live:
            (storage.partial / name).write_bytes(b"in progress")
        assert await storage.sweep_partial() == 2
        assert sorted(os.listdir(storage.partial)) == sorted(live)
        assert await storage.sweep_partial() == 0
        for name in live:
            (storage.partial / name).unlink()
    assert await storage.keys() == ["o/kept"]
    assert await read_all(storage, "o/kept") == b"kept"


def _gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------------------------------
# the local backend's own promises


async def test_local_modes_and_nothing_but_the_object(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "var" / "files")
    await storage.put("owner/file", chunks_of(b"private", 3))
    for directory in (tmp_path / "var", storage.root, storage.partial, storage.root / "owner"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE((storage.root / "owner" / "file").stat().st_mode) == 0o600
    assert sorted(os.listdir(storage.root)) == [".partial", "owner"]
    assert os.listdir(storage.partial) == []


def _kill_mid_upload(root: Path) -> None:
    """A child process puts o/killed under root and is killed (SIGKILL) halfway."""
    script = f"""
import asyncio
from pathlib import Path
from services.file.storage import LocalStorage

async def chunks():
    for _ in range(1000):
        yield b"x" * 65536
        print("chunk", flush=True)
        await asyncio.sleep(0.01)

asyncio.run(LocalStorage(Path({str(root)!r})).put("o/killed", chunks()))
"""
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    try:
        assert child.stdout is not None
        for _ in range(5):
            assert child.stdout.readline() == b"chunk\n"
        child.kill()
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


async def test_local_sweep_after_a_process_killed_mid_upload(tmp_path: Path) -> None:
    root = tmp_path / "files"
    _kill_mid_upload(root)
    storage = LocalStorage(root)
    assert len(os.listdir(storage.partial)) == 1
    assert await storage.keys() == []
    assert await storage.sweep_partial() == 1
    assert os.listdir(storage.partial) == []


# ---------------------------------------------------------------------------------------
# settings and URLs


def test_store_url_setting() -> None:
    assert config.load(env={}).file.store_url == ""
    for url in ("file:///srv/files", "s3://bucket", "s3://bucket/some/prefix"):
        assert config.load(env={"LEARNMESH_FILE_STORE_URL": url}).file.store_url == url
    for url in ("http://bucket", "file://relative/path", "s3://", "/srv/files", "gs://b"):
        with pytest.raises(config.ConfigError, match="LEARNMESH_FILE_STORE_URL"):
            config.load(env={"LEARNMESH_FILE_STORE_URL": url})


def test_storage_from_url(tmp_path: Path) -> None:
    default = storage_from_url("", tmp_path)
    assert isinstance(default, LocalStorage) and default.root == tmp_path / "files"
    elsewhere = storage_from_url(f"file://{tmp_path}/store", tmp_path)
    assert isinstance(elsewhere, LocalStorage) and elsewhere.root == tmp_path / "store"
    s3 = storage_from_url("s3://bucket/some/prefix/", tmp_path, env={"AWS_REGION": "eu-west-1"})
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    for url in ("file://relative", "s3://", "http://x", "s3://b/p?x=1"):
        with pytest.raises(ValueError, match="URL"):
            storage_from_url(url, tmp_path)
