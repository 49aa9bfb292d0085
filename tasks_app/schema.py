"""OpenAPI post-processing: what every operation may answer besides its own responses."""

ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
AUTH_ERROR = {"description": "missing, invalid or revoked token", "content": ERROR_BODY}
UNAVAILABLE = {"description": "database unavailable or queue full; see Retry-After", "content": ERROR_BODY}


def document_common_errors(result: dict, generator, request, public) -> dict:
    """Add 401 to each operation that requires a token and 503 to every API operation (drf-spectacular hook)."""
    for path, operations in result.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if any("bearerAuth" in requirement for requirement in operation.get("security", [])):
                responses.setdefault("401", AUTH_ERROR)
            if path.startswith("/v1/"):
                responses.setdefault("503", UNAVAILABLE)
    return result
