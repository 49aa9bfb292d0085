from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from tasks_app.models import WebhookSecret


class Command(BaseCommand):
    help = "Print USERNAME's webhook signing secret (created if needed); --rotate makes a new one."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--rotate", action="store_true")

    def handle(self, *args, username: str, rotate: bool, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user {username!r}")
        if rotate:
            WebhookSecret.objects.filter(user=user).delete()
        self.stdout.write(WebhookSecret.objects.get_or_create(user=user)[0].secret)
