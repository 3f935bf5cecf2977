"""The local SMTP sink: the default relay, so sending works with no credentials.

It accepts every message on ``MAILGENIUS_SINK_HOST:PORT`` and keeps it as an ``.eml`` file under
``MAILGENIUS_SINK_DIR`` (one file per message and recipient list), plus a running count.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid

from aiosmtpd.controller import Controller

log = logging.getLogger(__name__)


class SinkHandler:
    """aiosmtpd handler that writes each message to disk and counts what it received."""

    def __init__(self, directory: str | None = None, *, keep: bool = True):
        self.directory = directory
        self.keep = keep
        self.received = 0
        self.recipients = 0
        self.messages: list[tuple[str, list[str], bytes]] = []
        if directory:
            os.makedirs(directory, exist_ok=True)

    async def handle_DATA(self, server, session, envelope):
        self.received += 1
        self.recipients += len(envelope.rcpt_tos)
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode()
        if self.keep and self.directory:
            name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.eml"
            with open(os.path.join(self.directory, name), "wb") as fh:
                fh.write(data)
        elif self.keep:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), data))
        return "250 Message accepted for delivery"


def start_sink(host: str, port: int, directory: str | None = None) -> tuple[Controller, SinkHandler]:
    handler = SinkHandler(directory)
    controller = Controller(handler, hostname=host, port=port, ready_timeout=10,
                            data_size_limit=50 * 1024 * 1024)
    controller.start()
    return controller, handler


def run_sink(settings) -> int:
    from mailgenius.logs import setup_logging

    setup_logging("smtp-sink", settings.log_level)
    try:
        controller, _handler = start_sink(settings.sink_host, settings.sink_port, settings.sink_dir)
    except OSError as exc:
        print(f"mailgenius: smtp-sink: cannot listen on {settings.sink_host}:{settings.sink_port} "
              f"({exc.strerror}; set MAILGENIUS_SINK_PORT)", flush=True)
        return 3
    log.info("smtp sink listening", extra={"port": settings.sink_port, "dir": settings.sink_dir})
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(stop.wait())
    finally:
        controller.stop()
        loop.close()
    return 0
