"""Kept only while tests/test_admin.py, test_ratelimit.py, test_telemetry.py and
ratelimit_server.py (changed on other branches right now) import from here: the doubles
and the test server live in tests.support. Delete it once they import from there."""

from tests.support.doubles import COURSE_ID, CourseDouble, FileDouble, Script
from tests.support.servers import Served, serve

__all__ = ["COURSE_ID", "CourseDouble", "FileDouble", "Script", "Served", "serve"]
