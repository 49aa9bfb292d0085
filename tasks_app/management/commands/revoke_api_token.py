from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from tasks_app.models import ApiToken, hash_token


class Command(BaseCommand):
    help = (
        "Revoke an API token, given the raw token or the 8-character prefix shown in the admin "
        "(one that begins with '-' goes after '--')."
    )

    def add_arguments(self, parser):
        parser.add_argument("token")

    def handle(self, *args, token: str, **options):
        live = ApiToken.objects.filter(revoked_at__isnull=True)
        matches = live.filter(key_hash=hash_token(token)) if len(token) > 8 else live.filter(prefix=token)
        if matches.count() != 1:
            raise CommandError(f"{matches.count()} live tokens match; give the full token")
        matches.update(revoked_at=timezone.now())
        self.stdout.write("revoked")
