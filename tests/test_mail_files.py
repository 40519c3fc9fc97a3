"""Mail files hold secrets (a reset token): private from their creation, whatever the umask.

The umask is 0 in these tests, so only the modes the code asks for protect the files. One
test watches every file and folder the mailer creates at the instant it is created; one
asks for a password reset over the wire and looks at what landed in the Maildir.
"""

from __future__ import annotations

import asyncio
import mailbox
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from learnmesh.auth.v1 import auth_pb2
from learnmesh.mail import Mailer
from tests.conftest import mesh_settings, running_mesh
from tests.support.mesh import wait_for_mail


@pytest.fixture
def umask_zero() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def maildir_modes(mail_dir: Path) -> dict[str, int]:
    """The mode of the Maildir, of each folder and of each file in it, by relative path."""
    found = {".": mode(mail_dir)}
    for root, folders, files in os.walk(mail_dir):
        for name in [*folders, *files]:
            path = Path(root) / name
            found[str(path.relative_to(mail_dir))] = mode(path)
    return found


def assert_private(mail_dir: Path) -> None:
    for name, found in maildir_modes(mail_dir).items():
        wanted = 0o700 if (mail_dir / name).is_dir() else 0o600
        assert found == wanted, f"{name} has mode {found:o}, not {wanted:o}"


class CreationModes:
    """Records the mode of every file and directory the moment it is created."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files: dict[str, int] = {}
        self.folders: dict[str, int] = {}
        real_open, real_mkdir = os.open, os.mkdir

        def spy_open(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
            fd = real_open(path, flags, mode, **kwargs)
            if flags & os.O_CREAT:
                self.files[str(path)] = stat.S_IMODE(os.fstat(fd).st_mode)
            return fd

        def spy_mkdir(path: Any, mode: int = 0o777, **kwargs: Any) -> None:
            real_mkdir(path, mode, **kwargs)
            self.folders[str(path)] = stat.S_IMODE(os.stat(path).st_mode)

        monkeypatch.setattr(os, "open", spy_open)
        monkeypatch.setattr(os, "mkdir", spy_mkdir)


@pytest.mark.usefixtures("umask_zero")
async def test_mail_is_private_from_the_instant_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = CreationModes(monkeypatch)
    mailer = Mailer(tmp_path)
    keys = await asyncio.gather(
        *(mailer.send(f"user{i}@example.com", "Reset", f"token-{i}") for i in range(5))
    )
    monkeypatch.undo()

    mail_dir = tmp_path / "mail"
    folders = {Path(path): found for path, found in created.folders.items()}
    maildir = [mail_dir, *(mail_dir / f for f in ("tmp", "new", "cur"))]
    assert {path: folders.get(path) for path in maildir} == dict.fromkeys(maildir, 0o700)
    assert len(created.files) == 5
    assert all(found == 0o600 for found in created.files.values()), created.files
    assert_private(mail_dir)

    box = mailbox.Maildir(mail_dir, create=False)
    try:
        assert sorted(box.keys()) == sorted(keys)
        bodies = {box[k]["To"]: str(box[k].get_payload()).strip() for k in keys}
    finally:
        box.close()
    assert bodies == {f"user{i}@example.com": f"token-{i}" for i in range(5)}
    assert list((mail_dir / "tmp").iterdir()) == []  # every message moved into new/


@pytest.mark.usefixtures("umask_zero")
async def test_an_existing_wider_maildir_is_made_private(tmp_path: Path) -> None:
    for folder in ("", "tmp", "new", "cur"):
        (tmp_path / "mail" / folder).mkdir(mode=0o777, exist_ok=True)
    await Mailer(tmp_path).send("someone@example.com", "Hello", "body")
    assert_private(tmp_path / "mail")


@pytest.mark.usefixtures("umask_zero")
async def test_password_reset_mail_over_the_wire_is_private(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'learnmesh.db'}"
    async with running_mesh(mesh_settings(tmp_path, url)) as mesh:
        email = "reset-me@example.com"
        await mesh.register(email)
        await mesh.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email))
        [body] = await wait_for_mail(mesh.mail_dir, email)
        assert "/reset-password?token=" in body  # the secret the modes protect
        assert_private(mesh.mail_dir)
