"""B in another process: ``python -m tests.double_server [--delay S] [--fail-times N]``.

Serves tests/doubles.CourseDouble (plaintext, ephemeral port, no server chain), prints
``port <N>`` and runs until killed. ListCourses reports what it recorded, as JSON.
"""

from __future__ import annotations

import argparse
import asyncio

from tests.doubles import CourseDouble, serve


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-times", type=int, default=0)
    args = parser.parse_args()
    double = CourseDouble()
    double.script.delay = args.delay
    double.script.fail_times = args.fail_times
    served = await serve([], course=double)
    print(f"port {served.port}", flush=True)
    await served.server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
