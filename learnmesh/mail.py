"""Outbound mail into a local Maildir (``<var_dir>/mail``): CONTRACT.md's "local maildir".

Services that mail someone (a password-reset link, a notification) build the message here;
it lands as one RFC 5322 file per message that any mail reader, or a test, can open. The
notification service will add SMTP delivery later; callers do not change.
"""

from __future__ import annotations

import asyncio
import mailbox
import os
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


def _deliver(path: Path, message: EmailMessage) -> str:
    # Maildir makes its folders with mode 0700: mail may carry reset links.
    path.parent.mkdir(parents=True, exist_ok=True)
    box = mailbox.Maildir(path, create=True)
    try:
        return box.add(message)
    finally:
        box.close()


class Mailer:
    """Writes messages into the Maildir of one var directory, off the event loop."""

    def __init__(self, var_dir: str | os.PathLike[str], *, sender: str = DEFAULT_SENDER) -> None:
        self.path = maildir_path(var_dir)
        self.sender = sender

    async def send(self, to: str, subject: str, body: str) -> str:
        """Delivers one message; returns its Maildir key."""
        message = build_message(to, subject, body, sender=self.sender)
        return await asyncio.to_thread(_deliver, self.path, message)
