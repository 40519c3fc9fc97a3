"""Where the file service keeps the bytes of its files: a local directory or an S3 bucket.

``storage_from_url`` picks the backend from ``LEARNMESH_FILE_STORE_URL``: empty for
``var/files``, ``file:///abs/path`` for another directory, ``s3://bucket/prefix`` for S3
(credentials, region and endpoint from the standard ``AWS_*`` variables).

Both backends make a put atomic: readers see the whole object once ``put`` returns and
nothing before; a put that fails or is cancelled leaves nothing behind. Keys come from the
service (``<owner_id>/<file_id>``) but are checked anyway: segments of ``[A-Za-z0-9_-]``
joined by ``/``, nothing else.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import obstore
from obstore.store import S3Store

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

T = TypeVar("T")

DEFAULT_CHUNK_SIZE = 256 * 1024
# A local put writes once this much has arrived (or at the end).
WRITE_SIZE = 256 * 1024
# S3 refuses parts under 5 MiB (but the last); each part in flight is held in memory.
S3_PART_SIZE = 5 * 1024 * 1024
S3_MAX_CONCURRENCY = 2
MAX_KEY_LENGTH = 1024
PARTIAL_DIR = ".partial"
# A temporary file is named <host>~<pid>~<random>: a sweep removes those of processes that
# are gone from this host, and anything older than this many seconds (another host's, or
# a name it cannot read), but never an upload a live process is still writing.
PARTIAL_MAX_AGE = 24 * 3600.0

_KEY = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")
_PREFIX = re.compile(r"(?:[A-Za-z0-9_-]+/)*[A-Za-z0-9_-]*")
_TRUE = ("1", "true", "yes", "on")


class StorageNotFound(LookupError):
    """No object under the key."""


class Storage(Protocol):
    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Stores the chunks under key atomically and returns the number of bytes written.

        The object exists, whole, only once this returns; if the iterable raises or the
        task is cancelled, nothing is left under key or anywhere else. A cancellation that
        arrives while the object is being committed lets the commit finish, then deletes
        the object (and so what the key held before) before it is raised."""
        ...

    def read(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        """The bytes [start, end) (end clamped to the size), read as the consumer pulls, in
        chunks of at most chunk_size. A bad key or range raises ValueError here; a missing
        key raises StorageNotFound from the first pull."""
        ...

    async def delete(self, key: str) -> bool:
        """Removes the object; True if it existed. Deleting a missing key is no error."""
        ...

    async def keys(self, prefix: str = "") -> list[str]:
        """Every stored key starting with prefix, sorted."""
        ...

    async def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when there is none."""
        ...

    async def sweep_partial(self) -> int:
        """Removes what interrupted puts left (a process killed mid-upload); returns how
        many. Call it at start, before serving."""
        ...

    async def aclose(self) -> None: ...


def check_key(key: str) -> str:
    """The key itself, or ValueError if it is not segments of [A-Za-z0-9_-] joined by /."""
    given: object = key  # callers may pass anything at run time
    if not isinstance(given, str) or len(given) > MAX_KEY_LENGTH or not _KEY.fullmatch(given):
        raise ValueError(f"not a storage key: {key!r}")
    return key


def _check_prefix(prefix: str) -> str:
    given: object = prefix
    if not isinstance(given, str) or len(given) > MAX_KEY_LENGTH or not _PREFIX.fullmatch(given):
        raise ValueError(f"not a storage key prefix: {prefix!r}")
    return prefix


def _check_range(start: int, end: int | None, chunk_size: int) -> None:
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"not a byte range: [{start}, {end})")
    if chunk_size <= 0:
        raise ValueError("chunk_size must be greater than 0")


async def _settle(task: asyncio.Future[Any]) -> None:
    """Waits until task has ended, whatever it ends with, through any cancellation."""
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            continue
    if not task.cancelled():
        task.exception()  # retrieved: the caller raises its own


async def _to_the_end(work: Awaitable[T]) -> T:
    """Awaits work; a cancellation meanwhile is raised only once work has ended.

    For work in a thread (which cannot be stopped, and holds a file descriptor the cleanup
    closes) and for uploads that must see their own abort through."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await _settle(task)
        raise


# ---------------------------------------------------------------------------------------
# Local directory


def _make_dirs(path: Path) -> None:
    """Creates path and its missing parents 0700, syncing each parent a directory was
    added to."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        _fsync_dir(directory.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PartFile:
    """One put's temporary file in .partial/, used from worker threads one call at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.written = 0
        self.placed: Path | None = None

    def open(self) -> None:
        _make_dirs(self.path.parent)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        self.fd = os.open(self.path, flags, 0o600)

    def write(self, chunks: list[bytes]) -> None:
        assert self.fd is not None
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                done = os.write(self.fd, view)
                view = view[done:]
                self.written += done

    def commit(self, final: Path) -> None:
        assert self.fd is not None
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        _make_dirs(final.parent)
        os.replace(self.path, final)
        self.placed = final
        _fsync_dir(final.parent)

    def discard(self) -> None:
        """Removes the temporary file, or the object itself if the commit got that far."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.path.unlink(missing_ok=True)
        if self.placed is not None:
            self.placed.unlink(missing_ok=True)
            _fsync_dir(self.placed.parent)
            self.placed = None


class _ReadFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def open(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        self.fd = fd
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileNotFoundError(self.path)

    def read_at(self, offset: int, count: int) -> bytes:
        assert self.fd is not None
        return os.pread(self.fd, count, offset)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


_HOST = socket.gethostname().replace("~", "-")


def _abandoned(name: str) -> bool:
    """Whether the temporary file ``name`` belongs to a process gone from this host."""
    host, _, rest = name.partition("~")
    pid_text, _, _ = rest.partition("~")
    if host != _HOST or not pid_text.isdigit():
        return False  # another host's (or no name of ours): only its age can tell
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


class LocalStorage:
    """Objects as files under root (directories 0700, files 0600). A put writes a
    temporary file in root/.partial/, syncs it and renames it into place; file I/O runs in
    worker threads, never on the event loop."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.partial = self.root / PARTIAL_DIR

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        final = self._path(key)
        part = _PartFile(self.partial / f"{_HOST}~{os.getpid()}~{uuid.uuid4().hex}")
        committed = False
        try:
            await _to_the_end(asyncio.to_thread(part.open))
            # Small chunks are gathered up to WRITE_SIZE: one thread hop per write.
            pending: list[bytes] = []
            pending_size = 0
            async for chunk in chunks:
                if not chunk:
                    continue
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= WRITE_SIZE:
                    await _to_the_end(asyncio.to_thread(part.write, pending))
                    pending, pending_size = [], 0
            if pending:
                await _to_the_end(asyncio.to_thread(part.write, pending))
            await _to_the_end(asyncio.to_thread(part.commit, final))
            committed = True
            return part.written
        finally:
            if not committed:
                await _to_the_end(asyncio.to_thread(part.discard))

    def read(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        _check_range(start, end, chunk_size)
        return self._read(key, self._path(key), start, end, chunk_size)

    async def _read(
        self, key: str, path: Path, start: int, end: int | None, chunk_size: int
    ) -> AsyncIterator[bytes]:
        reader = _ReadFile(path)
        try:
            try:
                await _to_the_end(asyncio.to_thread(reader.open))
            except _MISSING:
                raise StorageNotFound(key) from None
            position = start
            while end is None or position < end:
                count = chunk_size if end is None else min(chunk_size, end - position)
                data = await _to_the_end(asyncio.to_thread(reader.read_at, position, count))
                if not data:
                    break
                position += len(data)
                yield data
        finally:
            await _to_the_end(asyncio.to_thread(reader.close))

    async def delete(self, key: str) -> bool:
        path = self._path(key)

        def unlink() -> bool:
            try:
                if not stat.S_ISREG(path.lstat().st_mode):
                    return False
                path.unlink()
            except _MISSING:
                return False
            return True

        return await _to_the_end(asyncio.to_thread(unlink))

    async def keys(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        base = self.root / prefix.rpartition("/")[0]

        def walk() -> list[str]:
            found = []
            for directory, subdirs, files in os.walk(base):
                here = Path(directory)
                if here == self.root:
                    subdirs[:] = [d for d in subdirs if d != PARTIAL_DIR]
                for name in files:
                    path = here / name
                    if not stat.S_ISREG(path.lstat().st_mode):
                        continue
                    key = path.relative_to(self.root).as_posix()
                    if key.startswith(prefix):
                        found.append(key)
            return sorted(found)

        return await asyncio.to_thread(walk)

    async def size(self, key: str) -> int | None:
        path = self._path(key)

        def size() -> int | None:
            try:
                info = path.stat()
            except _MISSING:
                return None
            return info.st_size if stat.S_ISREG(info.st_mode) else None

        return await asyncio.to_thread(size)

    async def sweep_partial(self) -> int:
        """Removes the temporary files of puts that will never finish: those of processes
        gone from this host (killed mid-upload), and any older than PARTIAL_MAX_AGE. The
        uploads of live processes (other replicas sharing the directory) are left alone."""

        def sweep() -> int:
            try:
                entries = list(os.scandir(self.partial))
            except FileNotFoundError:
                return 0
            removed = 0
            now = time.time()
            for entry in entries:
                try:
                    old = now - entry.stat(follow_symlinks=False).st_mtime > PARTIAL_MAX_AGE
                except FileNotFoundError:
                    continue  # finished (renamed) or discarded meanwhile
                if not old and not _abandoned(entry.name):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    Path(entry.path).unlink(missing_ok=True)
                removed += 1
            return removed

        return await _to_the_end(asyncio.to_thread(sweep))

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------------------------------
# S3 (obstore)


class _UploadAborted(Exception):
    """Raised into an upload to make obstore abort its multipart upload."""


_END = object()


class _Feed:
    """The chunks of one put as obstore pulls them, counted; abort() makes the pull under
    way (or the next) fail, and a failed pull makes obstore abort the multipart upload."""

    def __init__(self, chunks: AsyncIterable[bytes]) -> None:
        self._source = aiter(chunks)
        self._aborted = asyncio.Event()
        self.total = 0

    def abort(self) -> None:
        self._aborted.set()

    def __aiter__(self) -> _Feed:
        return self

    async def _pull(self) -> Any:
        try:
            return await anext(self._source)
        except StopAsyncIteration:
            return _END

    async def __anext__(self) -> bytes:
        if self._aborted.is_set():
            raise _UploadAborted
        pull = asyncio.ensure_future(self._pull())
        stop = asyncio.ensure_future(self._aborted.wait())
        try:
            await asyncio.wait((pull, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not pull.done():
                pull.cancel()
                await _settle(pull)
        if pull.cancelled() or self._aborted.is_set():
            raise _UploadAborted
        chunk = pull.result()
        if chunk is _END:
            raise StopAsyncIteration
        self.total += len(chunk)
        return bytes(chunk)


def _env_config(env: Mapping[str, str]) -> tuple[S3Config, ClientConfig]:
    config: S3Config = {}
    for variable, name in (
        ("AWS_ACCESS_KEY_ID", "access_key_id"),
        ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
        ("AWS_SESSION_TOKEN", "session_token"),
        ("AWS_DEFAULT_REGION", "region"),
        ("AWS_REGION", "region"),
        ("AWS_ENDPOINT_URL", "endpoint"),
    ):
        if env.get(variable):
            config[name] = env[variable]  # type: ignore[literal-required]
    client: ClientConfig = {}
    if env.get("AWS_ALLOW_HTTP", "").strip().lower() in _TRUE:
        client["allow_http"] = True
    return config, client


class S3Storage:
    """Objects in an S3 bucket (or an S3-compatible server) under an optional prefix,
    through obstore. Puts are multipart uploads streamed from the chunks (parts of
    ``part_size``, at most ``max_concurrency`` in flight); S3 shows the object only once the
    upload completes, and a failed or cancelled put aborts its upload."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        env: Mapping[str, str] | None = None,
        part_size: int = S3_PART_SIZE,
        max_concurrency: int = S3_MAX_CONCURRENCY,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 store needs a bucket")
        config, client = _env_config(os.environ if env is None else env)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._part_size = part_size
        self._max_concurrency = max_concurrency
        self._store = S3Store(
            bucket, prefix=self.prefix or None, config=config, client_options=client
        )

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        path = check_key(key)
        feed = _Feed(chunks)
        upload = asyncio.ensure_future(
            obstore.put_async(
                self._store,
                path,
                feed,
                use_multipart=True,
                chunk_size=self._part_size,
                max_concurrency=self._max_concurrency,
            )
        )
        try:
            await asyncio.shield(upload)
        except asyncio.CancelledError:
            # Cancelling obstore's future would drop the upload without aborting it (its
            # parts would stay in the bucket): fail its next pull and let it abort instead.
            feed.abort()
            await _settle(upload)
            if not upload.cancelled() and upload.exception() is None:
                # Every chunk had arrived and the upload completed meanwhile: the caller
                # learns that the put did not happen, so the object goes again.
                await _to_the_end(obstore.delete_async(self._store, path))
            raise
        return feed.total

    def read(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        _check_range(start, end, chunk_size)
        return self._read(check_key(key), start, end, chunk_size)

    async def _read(
        self, key: str, start: int, end: int | None, chunk_size: int
    ) -> AsyncIterator[bytes]:
        try:
            if start == 0 and end is None:
                result = await obstore.get_async(self._store, key)
            else:
                meta = await obstore.head_async(self._store, key)
                stop = meta["size"] if end is None else min(end, meta["size"])
                if start >= stop:
                    return
                result = await obstore.get_async(self._store, key, options={"range": (start, stop)})
        except FileNotFoundError:
            raise StorageNotFound(key) from None
        async for piece in result.stream(min_chunk_size=chunk_size):
            view = memoryview(piece)
            for offset in range(0, len(view), chunk_size):
                yield bytes(view[offset : offset + chunk_size])

    async def delete(self, key: str) -> bool:
        path = check_key(key)
        try:
            await obstore.head_async(self._store, path)
        except FileNotFoundError:
            return False
        await obstore.delete_async(self._store, path)
        return True

    async def keys(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        directory = prefix.rpartition("/")[0]
        found: list[str] = []
        async for batch in obstore.list(self._store, prefix=directory or None):
            found.extend(meta["path"] for meta in batch if meta["path"].startswith(prefix))
        return sorted(found)

    async def size(self, key: str) -> int | None:
        try:
            meta = await obstore.head_async(self._store, check_key(key))
        except FileNotFoundError:
            return None
        return meta["size"]

    async def sweep_partial(self) -> int:
        # obstore cannot list incomplete multipart uploads: the bucket's lifecycle rule
        # (AbortIncompleteMultipartUpload) expires what a killed process left.
        return 0

    async def aclose(self) -> None:
        return None


def storage_from_url(url: str, var_dir: Path, env: Mapping[str, str] | None = None) -> Storage:
    """The backend a ``LEARNMESH_FILE_STORE_URL`` names: empty for var_dir/files,
    ``file:///abs/path``, or ``s3://bucket/prefix`` (AWS_* variables from env, default
    the process environment)."""
    if not url:
        return LocalStorage(Path(var_dir) / "files")
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ValueError(f"a file store URL names an absolute path (file:///abs/path): {url}")
        return LocalStorage(Path(path))
    if parts.scheme == "s3":
        if not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"an S3 store URL is s3://bucket/prefix: {url}")
        return S3Storage(parts.netloc, unquote(parts.path), env=env)
    raise ValueError(f"a file store URL is empty, file:///abs/path or s3://bucket/prefix: {url}")
