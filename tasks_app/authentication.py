"""API authentication: ``Authorization: Bearer <key>`` (or DRF's ``Token <key>``) against ``ApiToken``."""
from django.contrib.auth import get_user_model
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from .models import ApiToken, hash_token

ACCEPTED_KEYWORDS = ("bearer", "token")
LOCAL_DEMO_USERNAME = "local"


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """Accepts a live (unrevoked) token of an active user; no header → anonymous (then 401)."""

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
        token = (
            ApiToken.objects.select_related("user")
            .filter(key_hash=hash_token(raw_key), revoked_at__isnull=True)
            .first()
        )
        if token is None or not token.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid or revoked token.")
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
        return token.user, token

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
