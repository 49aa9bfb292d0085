from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from tasks_app.models import ApiToken


class Command(BaseCommand):
    help = "Create USERNAME if needed and print a new API token for it (shown once)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="a label to tell this token apart")

    def handle(self, *args, username: str, name: str, **options):
        user, created = get_user_model().objects.get_or_create(username=username)
        if created:
            user.set_unusable_password()
            user.save(update_fields=["password"])
        _, raw_key = ApiToken.issue(user=user, name=name)
        self.stdout.write(raw_key)
