"""sd_notify in a few lines of stdlib: READY, STATUS and WATCHDOG pings for a Type=notify unit.

systemd passes NOTIFY_SOCKET (a datagram socket path, '@' for the abstract namespace) and, when
the unit sets WatchdogSec=, WATCHDOG_USEC (and WATCHDOG_PID). Outside systemd every call is a
no-op, so the daemon can call these unconditionally.
"""
from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # The watchdog is for us only when no PID is named or ours is.
        wanted = usec.isascii() and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if wanted else None  # ping at half the deadline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:  # systemd gone or socket not ours: never fatal for the service
            log.debug("sd_notify failed: %s", exc)
            return False

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def start_watchdog(self, alive=lambda: True) -> None:
        """Ping WATCHDOG=1 while `alive()` says the service is healthy."""
        if self.watchdog_interval is None or not self.enabled:
            return

        def loop() -> None:
            while not self._stop.wait(self.watchdog_interval):
                if alive():
                    self.send("WATCHDOG=1")

        self._thread = threading.Thread(target=loop, name="cones-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
