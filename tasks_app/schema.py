"""OpenAPI post-processing: what every authenticated operation may answer besides its own responses."""

AUTH_ERROR = {
    "description": "missing, invalid or revoked token",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def document_auth_errors(result: dict, generator, request, public) -> dict:
    """Add the 401 response to each operation that requires a token (drf-spectacular hook)."""
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            if any("bearerAuth" in requirement for requirement in operation.get("security", [])):
                operation.setdefault("responses", {}).setdefault("401", AUTH_ERROR)
    return result
