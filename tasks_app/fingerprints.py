"""Idempotency-Key parsing and the request fingerprints that tell "the same body" from another.

A fingerprint is the SHA-256 of a canonical form of what the client sent: JSON with sorted keys,
or the sorted multipart fields plus the SHA-256 of each uploaded file. Which endpoint was used is
part of it, so a JSON and a multipart submit never count as the same request.
"""
import hashlib
import json
import re

from rest_framework.exceptions import ValidationError

IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY_RULE = re.compile(r"^[\x21-\x7e]{1,255}$")


def idempotency_key(request) -> str:
    """The request's Idempotency-Key, or "" when absent; 400 naming the header when malformed."""
    raw = request.headers.get(IDEMPOTENCY_HEADER)
    if raw is None:
        return ""
    if not _KEY_RULE.match(raw):
        raise ValidationError({IDEMPOTENCY_HEADER: ["must be 1-255 printable ASCII characters without spaces"]})
    return raw


def json_request(data) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _sha256(b"json\n" + canonical.encode("utf-8", "surrogatepass"))  # unknown fields may hold any text


def form_request(fields, files) -> str:
    digest = hashlib.sha256(b"form\n")
    for name in sorted(fields):
        digest.update(json.dumps([name, fields.getlist(name)], ensure_ascii=False).encode("utf-8", "surrogatepass"))
    for name in sorted(files):
        for upload in files.getlist(name):
            file_digest = hashlib.sha256()
            for chunk in upload.chunks():
                file_digest.update(chunk)
            upload.seek(0)
            digest.update(json.dumps([name, file_digest.hexdigest()]).encode())
    return digest.hexdigest()


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
