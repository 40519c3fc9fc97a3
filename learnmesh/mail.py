"""Outbound mail into a local Maildir (``<var_dir>/mail``): CONTRACT.md's "local maildir".

Services that mail someone (a password-reset link, a notification) build the message here;
it lands as one RFC 5322 file per message that any mail reader, or a test, can open. The
notification service will add SMTP delivery later; callers do not change.

Mail carries secrets (a reset link holds a reset token), so the Maildir's folders are
mode 0700 and every message file 0600, from their creation and whatever the umask: a file
is made with that mode in tmp/, written, then renamed into new/ (the Maildir protocol), so
no reader ever sees a file that is half written or was ever readable by others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

DEFAULT_SENDER = "learnmesh <no-reply@learnmesh.invalid>"


def maildir_path(var_dir: str | os.PathLike[str]) -> Path:
    return Path(var_dir) / "mail"


def build_message(
    to: str, subject: str, body: str, *, sender: str = DEFAULT_SENDER
) -> EmailMessage:
    """A plain-text RFC 5322 message with the headers a mail reader expects."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain="learnmesh.invalid")
    message.set_content(body)
    return message


PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
MAILDIR_FOLDERS = ("tmp", "new", "cur")


def _private_dir(path: Path) -> None:
    """``path`` as a directory of mode 0700: made with it (the umask can only narrow it), or
    brought to it when it exists with another mode."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, PRIVATE_DIR)
    if path.stat().st_mode & 0o777 != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)


def _write_private(path: Path, data: bytes) -> None:
    """Creates ``path`` (it must not exist) with mode 0600 and writes ``data`` to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # a umask like 0o277 would have taken the owner's write
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
        os.fsync(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _unique_name() -> str:
    """A Maildir file name: seconds, microseconds, process and a random part."""
    now = time.time()
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}R{uuid.uuid4().hex}.learnmesh"


def _deliver(path: Path, message: EmailMessage) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    _private_dir(path)
    for folder in MAILDIR_FOLDERS:
        _private_dir(path / folder)
    key = _unique_name()
    temporary = path / "tmp" / key
    _write_private(temporary, message.as_bytes())
    os.rename(temporary, path / "new" / key)
    return key


class Mailer:
    """Writes messages into the Maildir of one var directory, off the event loop."""

    def __init__(self, var_dir: str | os.PathLike[str], *, sender: str = DEFAULT_SENDER) -> None:
        self.path = maildir_path(var_dir)
        self.sender = sender

    async def send(self, to: str, subject: str, body: str) -> str:
        """Delivers one message; returns its Maildir key."""
        message = build_message(to, subject, body, sender=self.sender)
        return await asyncio.to_thread(_deliver, self.path, message)
