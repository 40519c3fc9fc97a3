"""What a file is, from its first bytes, and which types each purpose accepts.

The declared content type is only a claim: the first ``SNIFF_BYTES`` of the upload are
matched against known signatures (puremagic, a maintained pure-Python signature database),
and the upload is refused unless the bytes are of the declared type and that type is
allowed for the purpose. Executables and scripts are refused whatever is declared. Files
with no signature are plain text only when they decode as UTF-8 without NUL bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import puremagic

# How much of the start of an upload is read before anything is stored.
SNIFF_BYTES = 8192

IMAGES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
OFFICE = frozenset(
    {
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    }
)
TEXT = frozenset({"text/plain", "text/markdown", "text/csv"})
ALLOWED: dict[str, frozenset[str]] = {
    "avatar": IMAGES,
    "course_material": IMAGES
    | OFFICE
    | TEXT
    | {"application/pdf", "application/zip", "video/mp4", "video/webm", "audio/mpeg"},
    "attachment": IMAGES | OFFICE | TEXT | {"application/pdf", "application/zip"},
}
# Spellings of one type that clients send.
ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "audio/mp3": "audio/mpeg"}
# Signatures that run as programs: refused for every purpose.
EXECUTABLE_PREFIXES = (
    b"\x7fELF",
    b"MZ",
    b"#!",
    b"\xfe\xed\xfa",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",
)


@dataclass(frozen=True)
class Sniffed:
    # The types the bytes may be (several for containers: a zip is also a docx).
    types: frozenset[str]
    executable: bool
    text: bool

    def describe(self) -> str:
        if self.executable:
            return "an executable program"
        if self.text:
            return "plain text"
        if not self.types:
            return "of no type this service knows"
        return " or ".join(sorted(self.types))


def normal_type(declared: str) -> str:
    """``Image/JPG; charset=x`` → ``image/jpeg``."""
    bare = declared.split(";", 1)[0].strip().lower()
    return ALIASES.get(bare, bare)


def sniff(head: bytes) -> Sniffed:
    if head.startswith(EXECUTABLE_PREFIXES):
        return Sniffed(frozenset(), executable=True, text=False)
    try:
        matches = puremagic.magic_string(head)
    except puremagic.PureError:
        matches = []
    types = frozenset(normal_type(m.mime_type) for m in matches if m.mime_type)
    executable = any("executable" in m.name.lower() for m in matches)
    if types or executable:
        return Sniffed(types, executable=executable, text=False)
    return Sniffed(frozenset(), executable=False, text=_is_text(head))


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the sniffed part is still text.
        return exc.start >= len(head) - 3 and exc.reason == "unexpected end of data"
    return True


def refusal(declared: str, purpose: str, sniffed: Sniffed) -> str | None:
    """Why the upload is refused, or None when its bytes match an allowed declared type."""
    allowed = ALLOWED[purpose]
    if declared not in allowed:
        return f"{declared} is not accepted for {purpose}; accepted: {', '.join(sorted(allowed))}"
    if sniffed.executable:
        return "the file is an executable program, which is never accepted"
    if declared in TEXT:
        if sniffed.text:
            return None
    elif declared in sniffed.types:
        return None
    return f"the file's bytes are {sniffed.describe()}, not {declared}"
