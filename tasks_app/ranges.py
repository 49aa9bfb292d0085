"""Streaming a file with HTTP ``Range: bytes=`` support (206), so browsers can play and seek videos.

One range per request (what players send); a header this does not understand is ignored (the whole
file, 200), a range that starts past the end is 416, as RFC 9110 says.
"""
import re
from pathlib import Path

from django.http import FileResponse, HttpResponse, StreamingHttpResponse

_SINGLE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK_BYTES = 64 * 1024


def _requested_span(header: str, size: int) -> tuple[int, int] | None | str:
    """(first, last) byte positions; None for no usable range; "unsatisfiable" when it starts past the end."""
    match = _SINGLE_RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        length = int(last)
        return (max(size - length, 0), size - 1) if length and size else "unsatisfiable"
    first = int(first)
    last = min(int(last), size - 1) if last else size - 1
    if first >= size:
        return "unsatisfiable"
    return None if last < first else (first, last)


def _read_span(path: Path, first: int, last: int):
    with path.open("rb") as handle:
        handle.seek(first)
        remaining = last - first + 1
        while remaining > 0:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


def file_response(request, path: Path, content_type: str):
    """The whole file (200) or the requested byte range (206); ``Accept-Ranges: bytes`` either way."""
    size = path.stat().st_size
    span = _requested_span(request.headers.get("Range", ""), size) if request.headers.get("Range") else None
    if span == "unsatisfiable":
        response = HttpResponse(b'{"detail": "Range not satisfiable."}', status=416, content_type="application/json")
        response["Content-Range"] = f"bytes */{size}"
    elif span is None:
        response = FileResponse(path.open("rb"), content_type=content_type, filename=path.name)
    else:
        first, last = span
        response = StreamingHttpResponse(_read_span(path, first, last), status=206, content_type=content_type)
        response["Content-Range"] = f"bytes {first}-{last}/{size}"
        response["Content-Length"] = str(last - first + 1)
    response["Accept-Ranges"] = "bytes"
    return response
