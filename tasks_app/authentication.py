"""API authentication: ``Authorization: Bearer <key>`` (or DRF's ``Token <key>``) against ``ApiToken``.

Every API request passes here, so the check is one plain query (token joined to its user) and
``last_used_at`` is written only when the stored value is older than ``LAST_USED_RESOLUTION``:
a client polling many times a second costs no write per poll.
"""
import functools
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from . import rows
from .models import ApiToken, hash_token

ACCEPTED_KEYWORDS = ("bearer", "token")
LOCAL_DEMO_USERNAME = "local"
LAST_USED_RESOLUTION = timedelta(minutes=1)


@functools.cache
def _token_query() -> tuple[str, list, list]:
    """The SQL of ``live_token_user`` (built once per process), the user fields and token fields it selects."""
    user_model = get_user_model()
    users, tokens = user_model._meta.db_table, ApiToken._meta.db_table
    user_fields = rows.fields_of(user_model, user_model._meta.pk.name, user_model.USERNAME_FIELD, "is_active")
    token_fields = rows.fields_of(ApiToken, "id", "last_used_at")
    sql = (
        f'SELECT {rows.columns(*user_fields, *token_fields)} FROM "{tokens}"'
        f' JOIN "{users}" ON "{users}"."{user_model._meta.pk.column}" = "{tokens}".user_id'
        f' WHERE "{tokens}".key_hash = %s AND "{tokens}".revoked_at IS NULL'
    )
    return sql, user_fields, token_fields


def live_token_user(key_hash: str):
    """The user of the unrevoked token with ``key_hash`` (only its id, username and is_active
    loaded), with ``token_id`` and ``token_last_used_at`` attributes; None when there is no such
    token. Whether the user is active is the caller's check."""
    sql, user_fields, token_fields = _token_query()
    found = rows.converted_rows(sql, [key_hash], user_fields + token_fields)
    if not found:
        return None
    user = rows.instance(get_user_model(), user_fields, found[0][: len(user_fields)])
    user.token_id, user.token_last_used_at = found[0][len(user_fields) :]
    return user


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """Accepts a live (unrevoked) token of an active user; no header → anonymous (then 401).

    ``request.auth`` is the token's id.
    """

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower().decode(errors="replace") not in ACCEPTED_KEYWORDS:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Authorization header must be 'Bearer <token>'.")
        try:
            raw_key = header[1].decode()
        except UnicodeDecodeError as exc:
            raise exceptions.AuthenticationFailed("Invalid token.") from exc
        user = live_token_user(hash_token(raw_key))
        if user is None or not user.is_active:
            raise exceptions.AuthenticationFailed("Invalid or revoked token.")
        now = timezone.now()
        if user.token_last_used_at is None or now - user.token_last_used_at >= LAST_USED_RESOLUTION:
            ApiToken.objects.filter(pk=user.token_id).update(last_used_at=now)
        return user, user.token_id

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'


class LocalDemoAuthentication(authentication.BaseAuthentication):
    """Opt-in (``LIGHTX2V_ALLOW_ANONYMOUS``, DEBUG only): requests without a token act as user "local"."""

    def authenticate(self, request):
        user, _ = get_user_model().objects.get_or_create(username=LOCAL_DEMO_USERNAME)
        return user, None


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """Documents ``BearerTokenAuthentication`` in the OpenAPI schema as HTTP bearer auth."""

    target_class = BearerTokenAuthentication
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "an API token from `manage.py create_api_token`"}
