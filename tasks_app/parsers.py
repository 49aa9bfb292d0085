"""The parsers of the submit endpoints: DRF's, made to refuse what they would otherwise mangle.

JSON: strings PostgreSQL cannot store, nesting deeper than Python's recursion limit and bodies of
more than ``MAX_JSON_CONTAINERS`` objects and arrays (memory) are a 400, not a 500. Multipart: an
``image_file`` part that Django's parser drops is a 400 naming it, not a text-to-video task.

A JSON string may spell an unpaired surrogate (``"\\ud800"``): Python accepts it, UTF-8 (and so
the database) cannot hold it, so the body is a 400 here rather than a failed insert. (Bodies over
``DATA_UPLOAD_MAX_MEMORY_SIZE`` never get this far: DRF reads them through ``HttpRequest.body``,
and ``tasks_app.errors`` answers Django's refusal with 413.)
"""
import json
import re

from django.utils.http import parse_header_parameters
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import JSONParser, MultiPartParser

# Lone surrogates can only come from \u escapes (the UTF-8 decoder refuses encoded ones); a body
# without any D800-DFFF escape skips the full check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


# Objects and arrays one JSON body may open. A submit needs a handful; each empty "{}" costs Python
# about 30 times its two bytes, so a body at the size limit could otherwise take a gigabyte.
MAX_JSON_CONTAINERS = 10_000


class UnicodeJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        body = parser_context["request"].body
        if body.count(b"{") + body.count(b"[") > MAX_JSON_CONTAINERS:  # an over-count (brackets in strings) is fine
            raise ParseError(f"JSON parse error - more than {MAX_JSON_CONTAINERS} objects and arrays")
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            raise ParseError("JSON parse error - nested too deeply") from exc
        if _SURROGATE_ESCAPE.search(body):
            try:
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ParseError("JSON parse error - a string holds an unpaired surrogate (\\uD800-\\uDFFF)") from exc
        return data


UPLOAD_FIELDS = ("image_file",)
_DISPOSITION = re.compile(rb"(?im)^content-disposition:([^\r\n]*)")
_MAX_PART_HEADERS = 64 * 1024


class UploadMultiPartParser(MultiPartParser):
    """DRF's multipart parser, refusing an upload part that Django's parser would silently drop.

    Django skips a part whose ``Content-Disposition`` is not UTF-8 (a Latin-1 ``filename="café.png"``)
    or whose filename sanitizes to nothing (``".."``, ``"/"``): the task would quietly run as T2V.
    """

    def parse(self, stream, media_type=None, parser_context=None):
        boundary = parse_header_parameters(media_type or "")[1].get("boundary", "")
        if not boundary or stream is None:
            return super().parse(stream, media_type, parser_context)
        watched = _PartNames(stream, boundary.encode("latin-1", "replace"))
        parsed = super().parse(watched, media_type, parser_context)
        for name in UPLOAD_FIELDS:
            if name in watched.names and name not in parsed.files and name not in parsed.data:
                raise ValidationError({name: ["the upload could not be read: its filename must be UTF-8 and "
                                              "name a file (not empty, '.' or '..')"]})  # fmt: skip
        return parsed


class _PartNames:
    """A read-through stream that collects the ``name`` of every multipart part passing through it."""

    def __init__(self, stream, boundary: bytes):
        self._stream, self._delimiter = stream, b"--" + boundary + b"\r\n"
        self._unscanned = b""  # the end of the data read so far, where a delimiter or header may continue
        self.names: set[str] = set()

    def read(self, size=-1):
        chunk = self._stream.read(size)
        self._scan(self._unscanned + chunk)
        return chunk

    def _scan(self, data: bytes) -> None:
        start = 0
        while (at := data.find(self._delimiter, start)) != -1:
            end = data.find(b"\r\n\r\n", at)
            if end == -1:  # the part's headers go on in the next chunk
                self._unscanned = data[at : at + _MAX_PART_HEADERS]
                return
            if match := _DISPOSITION.search(data, at, end + 2):  # parsed as Django parses it, but never refused
                name = parse_header_parameters(match.group(1).decode("latin-1"))[1].get("name")
                if name is not None:
                    self.names.add(name.strip())
            start = end
        self._unscanned = data[max(start, len(data) - len(self._delimiter)) :]
