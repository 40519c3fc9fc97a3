"""B in another process, traced: ``python -m tests.traced_server``.

Serves tests/doubles.CourseDouble behind [RequestId, Tracing, Metrics, ErrorMapping] with
tracing and logging set up as a real process does (``learnmesh.telemetry``, from the
``OTEL_*`` environment), prints ``port <N>`` and runs until SIGTERM, then flushes its spans.
With OTEL_TRACES_EXPORTER=console the spans appear on stdout, the JSON log on stderr.
"""

from __future__ import annotations

import asyncio
import signal

from interceptors.errors import ErrorMapping
from interceptors.metrics import Metrics
from interceptors.request_id import RequestId
from interceptors.tracing import Tracing
from learnmesh.kernel.logs import setup_logging
from learnmesh.telemetry import setup_tracing
from tests.doubles import CourseDouble, serve


async def main() -> None:
    provider = setup_tracing("course-double")
    logs = setup_logging("INFO")
    served = await serve([RequestId(), Tracing(), Metrics(), ErrorMapping()], course=CourseDouble())
    print(f"port {served.port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await served.stop()
    provider.shutdown()
    logs.close()


if __name__ == "__main__":
    asyncio.run(main())
