"""A progress bar for task status bodies, with an ETA from the observed progress rate (else the server's).

On a terminal it redraws one line; otherwise (a pipe, a log) it writes a line per change.
"""
import sys
import time

BAR_WIDTH = 30


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = round(seconds)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class EtaEstimator:
    """ETA = remaining progress / rate, the rate measured since progress first moved past 0."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.start: tuple[float, float] | None = None

    def update(self, progress: float) -> float | None:
        now = self.clock()
        if self.start is None:
            if progress > 0:
                self.start = (now, progress)
            return None
        started_at, started_progress = self.start
        if progress >= 1.0:
            return 0.0
        if progress <= started_progress or now <= started_at:
            return None
        rate = (progress - started_progress) / (now - started_at)
        return (1.0 - progress) / rate


class ProgressBar:
    """``update(status_body)`` draws ``[####....]  45%  step 3/4  ETA 00:03``; ``close()`` ends the line."""

    def __init__(self, stream=None, *, label: str = ""):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = label
        self.eta = EtaEstimator()
        self.last_line = ""

    def render(self, status: dict) -> str:
        progress = min(max(float(status.get("progress") or 0.0), 0.0), 1.0)
        eta = self.eta.update(progress)
        if eta is None and isinstance(status.get("eta_s"), (int, float)):
            eta = status["eta_s"]  # the server's estimate (from its step times) until a rate is measured here
        filled = int(progress * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        state = status.get("status", "")
        message = status.get("message") or ""
        text = message or state
        if state == "submitted" and status.get("queue_position"):
            text = f"queued, position {status['queue_position']}"
        elif state in ("succeed", "cancelled") and not text.startswith(state):
            text = f"{state}: {text}"
        eta_text = f"  ETA {format_eta(eta)}" if state == "running" else ""
        return f"{self.label}[{bar}] {progress * 100:3.0f}%  {text}{eta_text}"

    def update(self, status: dict) -> None:
        line = self.render(status)
        if self.tty:
            padding = " " * max(len(self.last_line) - len(line), 0)
            self.stream.write(f"\r{line}{padding}")
        elif _without_eta(line) != _without_eta(self.last_line):
            self.stream.write(line + "\n")
        self.stream.flush()
        self.last_line = line

    def close(self) -> None:
        if self.tty and self.last_line:
            self.stream.write("\n")
            self.stream.flush()
        self.last_line = ""


def _without_eta(line: str) -> str:
    return line.split("  ETA ", 1)[0]
