"""The JSON parser of the submit endpoint: DRF's, refusing strings PostgreSQL cannot store and
nesting deeper than Python's recursion limit (both a 400, not a 500).

A JSON string may spell an unpaired surrogate (``"\\ud800"``): Python accepts it, UTF-8 (and so
the database) cannot hold it, so the body is a 400 here rather than a failed insert. (Bodies over
``DATA_UPLOAD_MAX_MEMORY_SIZE`` never get this far: DRF reads them through ``HttpRequest.body``,
and ``tasks_app.errors`` answers Django's refusal with 413.)
"""
import json
import re

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

# Lone surrogates can only come from \u escapes (the UTF-8 decoder refuses encoded ones); a body
# without any D800-DFFF escape skips the full check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class UnicodeJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            raise ParseError("JSON parse error - nested too deeply") from exc
        if _SURROGATE_ESCAPE.search(parser_context["request"].body):
            try:
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ParseError("JSON parse error - a string holds an unpaired surrogate (\\uD800-\\uDFFF)") from exc
        return data
