"""Streaming a file with HTTP ``Range: bytes=`` support (206), so browsers can play and seek videos.

One range per request (what players send); a header this does not understand is ignored (the whole
file, 200), a range that starts past the end is 416, as RFC 9110 says.
"""
import re
from pathlib import PurePosixPath

from django.http import FileResponse, HttpResponse, StreamingHttpResponse

_SINGLE_RANGE = re.compile(r"^bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)$", re.IGNORECASE)  # units: RFC 9110 14.1
CHUNK_BYTES = 64 * 1024
MAX_POSITION_DIGITS = 19


def _requested_span(header: str, size: int) -> tuple[int, int] | None | str:
    """(first, last) byte positions; None for no usable range; "unsatisfiable" when it starts past the end."""
    match = _SINGLE_RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        length = _position(last)
        return (max(size - length, 0), size - 1) if length and size else "unsatisfiable"
    first = _position(first)
    last = min(_position(last), size - 1) if last else size - 1
    if first >= size:
        return "unsatisfiable"
    return None if last < first else (first, last)


def _position(digits: str) -> int:
    """A byte position; any number of digits (int() refuses over 4300), capped far beyond any file."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= MAX_POSITION_DIGITS else 10**MAX_POSITION_DIGITS


def _read_span(store, name: str, first: int, last: int):
    """Bytes ``first..last`` of a stored file, streamed: an S3 ranged GET, or seek + read elsewhere."""
    if hasattr(store, "bucket"):  # django-storages S3: let the bucket cut the range
        body = store.bucket.Object(store._normalize_name(name)).get(Range=f"bytes={first}-{last}")["Body"]
        yield from body.iter_chunks(CHUNK_BYTES)
        return
    with store.open(name, "rb") as handle:
        handle.seek(first)
        remaining = last - first + 1
        while remaining > 0:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


def file_response(request, store, name: str, content_type: str):
    """The stored file ``name`` whole (200) or the requested byte range (206); ``Accept-Ranges: bytes``."""
    size = store.size(name)
    span = _requested_span(request.headers.get("Range", ""), size) if request.headers.get("Range") else None
    if span == "unsatisfiable":
        response = HttpResponse(b'{"detail": "Range not satisfiable."}', status=416, content_type="application/json")
        response["Content-Range"] = f"bytes */{size}"
    elif span is None:
        response = FileResponse(store.open(name, "rb"), content_type=content_type, filename=PurePosixPath(name).name)
        response["Content-Length"] = str(size)
    else:
        first, last = span
        response = StreamingHttpResponse(_read_span(store, name, first, last), status=206, content_type=content_type)
        response["Content-Range"] = f"bytes {first}-{last}/{size}"
        response["Content-Length"] = str(last - first + 1)
    response["Accept-Ranges"] = "bytes"
    return response
