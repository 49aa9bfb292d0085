"""A small ``requests`` client of the LightX2V video API (../shared/API.md): submit, poll, cancel, download.

Errors are two exceptions: ``ApiError`` (the server answered 4xx/5xx; ``message`` is its ``detail`` or
its field errors) and ``ServerUnreachable`` (no answer: refused, reset, timed out).
"""
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Self
from urllib.parse import quote

import requests

FINISHED = ("succeed", "failed", "cancelled")
# Worth asking again after a while (Retry-After): too many unfinished tasks, queue full, gateway trouble.
RETRYABLE_STATUS = (429, 502, 503, 504)
CHUNK_BYTES = 1 << 16
_UMASK = os.umask(0o022)  # read once, at import (os.umask can only read it by setting it)
os.umask(_UMASK)


class ApiError(Exception):
    """The server refused a request; ``status_code`` and ``body`` (parsed JSON, or None) are kept."""

    def __init__(self, status_code: int, message: str, body=None):
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code, self.message, self.body = status_code, message, body


class ServerUnreachable(Exception):
    """No HTTP answer (connection refused or reset, DNS failure, timeout)."""


def reason(status: dict) -> str:
    """A status body's message without a repeated status word (``failed: X`` -> ``X``)."""
    message = status.get("message") or "no reason given"
    return message.removeprefix(f"{status.get('status')}: ")


def error_message(body, fallback: str = "") -> str:
    """One line from an error body: ``detail``, ``field: rule; ...``, or a status body's message."""
    if isinstance(body, dict):
        if isinstance(body.get("detail"), str):
            return body["detail"]
        if "status" in body and "message" in body and "task_id" in body:
            return f"task {body['task_id']} is {body['status']}: {reason(body)}"
        parts = []
        for field, problems in body.items():
            problems = problems if isinstance(problems, list) else [problems]
            parts.append(f"{field}: {', '.join(str(problem) for problem in problems)}")
        if parts:
            return "; ".join(parts)
    if isinstance(body, list) and body:
        return "; ".join(str(item) for item in body)
    return fallback


class Client:
    """One server and token; every method raises ``ApiError`` or ``ServerUnreachable`` on failure."""

    def __init__(
        self, server: str, token: str = "", *, timeout: float = 30, retries: int = 3, backoff_s: float = 1.0,
        on_retry=None,
    ):
        """``on_retry(reason, wait_s)``, if given, hears of each retry before its wait."""
        self.server = server.rstrip("/")
        self.timeout, self.retries, self.backoff_s, self.on_retry = timeout, retries, backoff_s, on_retry
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _request(self, method: str, path: str, *, retry: bool = True, **kwargs) -> requests.Response:
        """One call, retried on no answer or 429/502/503/504 (honouring ``Retry-After``) when ``retry``.

        A malformed server URL or header is a ``ValueError`` at once, not retried as an unreachable server.
        """
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self.session.request(method, self.server + path, timeout=self.timeout, **kwargs)
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                    requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader) as exc:  # fmt: skip
                raise ValueError(f"{self.server}: {exc}") from exc
            except requests.RequestException as exc:
                if last:
                    raise ServerUnreachable(f"{self.server}: {exc}") from exc
                self._wait_before_retry("no answer", self.backoff_s * 2**attempt)
                continue
            if response.status_code in RETRYABLE_STATUS and not last:
                why = f"HTTP {response.status_code}: {_api_error(response).message}"
                response.close()
                self._wait_before_retry(why, _retry_after(response, self.backoff_s * 2**attempt))
                continue
            if response.status_code >= 400:
                raise _api_error(response)
            return response
        raise AssertionError("unreachable")

    def _wait_before_retry(self, reason: str, wait_s: float) -> None:
        if self.on_retry is not None:
            self.on_retry(reason, wait_s)
        time.sleep(wait_s)

    def submit(self, params: dict, *, image: str | os.PathLike | None = None, idempotency_key: str = "") -> dict:
        """Create a task (JSON, or multipart with ``image_file``); retries reuse one ``Idempotency-Key``."""
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        if image is None:
            return self._request("POST", "/v1/tasks/video", json=params, headers=headers).json()
        image_path = Path(image)
        data = {name: str(value) for name, value in params.items()}
        content = image_path.read_bytes()  # read once: every retry sends the same bytes
        files = {"image_file": (image_path.name, content, _image_type(image_path))}
        return self._request("POST", "/v1/tasks/video/form", data=data, files=files, headers=headers).json()

    def status(self, task_id: str) -> dict:
        return self._request("GET", _task_path(task_id, "/status")).json()

    def cancel(self, task_id: str) -> dict:
        return self._request("DELETE", _task_path(task_id), retry=False).json()

    def wait(self, task_id: str, *, interval: float = 0.5, on_update=None, give_up_after_s: float = 120) -> dict:
        """Poll until the task finishes; ``on_update(status)`` sees every answer.

        Lost answers (no connection, 5xx) are skipped until ``give_up_after_s`` of them in a row.
        """
        failing_since = None
        while True:
            try:
                body = self._request("GET", _task_path(task_id, "/status"), retry=False)
                failing_since = None
            except (ServerUnreachable, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status_code < 500:
                    raise
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > give_up_after_s:
                    raise
                time.sleep(max(interval, 1.0))
                continue
            status = body.json()
            if on_update is not None:
                on_update(status)
            if status["status"] in FINISHED:
                return status
            time.sleep(interval)

    def download(self, task_id: str, out: str | os.PathLike) -> int:
        """Stream the task's video to ``out`` (a temp file in the same folder, then renamed); returns bytes.

        A connection lost mid-way resumes with ``Range`` where the server supports it.
        """
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                written = self._stream_into(_task_path(task_id, "/result"), handle)
            os.chmod(temp_name, 0o666 & ~_UMASK)  # what open() would have given it (mkstemp: 0600)
            os.replace(temp_name, out)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        return written

    def _stream_into(self, path: str, handle) -> int:
        written, expected = 0, None
        for attempt in range(self.retries + 1):
            headers = {"Range": f"bytes={written}-"} if written else {}
            response = self._request("GET", path, stream=True, headers=headers)
            with response:
                if written and response.status_code != 206:  # no resume: start over
                    handle.seek(0)
                    handle.truncate()
                    written = 0
                if expected is None and response.status_code == 200 and response.headers.get("Content-Length"):
                    expected = int(response.headers["Content-Length"])
                try:
                    for chunk in response.iter_content(CHUNK_BYTES):
                        handle.write(chunk)
                        written += len(chunk)
                except requests.RequestException as exc:
                    if attempt == self.retries:
                        raise ServerUnreachable(f"download interrupted: {exc}") from exc
                    time.sleep(self.backoff_s * 2**attempt)
                    continue
            if expected is not None and written != expected:
                if attempt == self.retries:
                    raise ServerUnreachable(f"download ended at {written} of {expected} bytes")
                continue
            return written
        raise AssertionError("unreachable")


def _task_path(task_id: str, suffix: str = "") -> str:
    return f"/v1/tasks/{quote(str(task_id), safe='')}{suffix}"


def _api_error(response: requests.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    fallback = response.text.strip()[:200] or response.reason or "error"
    return ApiError(response.status_code, error_message(body, fallback), body)


def _retry_after(response: requests.Response, default: float) -> float:
    try:
        return min(float(response.headers.get("Retry-After", default)), 30.0)
    except ValueError:
        return default


def _image_type(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(
        suffix, "application/octet-stream"
    )
