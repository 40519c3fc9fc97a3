"""The REST/JSON bridge (a later issue)."""
