from pathlib import Path

from django.core.management.base import BaseCommand

from inference.tiny import build_tiny_models


class Command(BaseCommand):
    help = "Build a tiny random Wan2.1 T2V + I2V pair (DIR/t2v, DIR/i2v) offline, for tests and demos."

    def add_arguments(self, parser):
        parser.add_argument("directory", type=Path)
        parser.add_argument("--force", action="store_true", help="rebuild even if present")

    def handle(self, *args, directory: Path, force: bool, **options):
        for kind, path in build_tiny_models(directory, force=force).items():
            self.stdout.write(f"{kind}: {path}")
