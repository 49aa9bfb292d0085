from pathlib import Path

from django.core.management.base import BaseCommand

from inference.tiny import build_tiny_lora, build_tiny_models

TINY_LORAS = {"alpha": 1, "beta": 2}  # name -> seed


class Command(BaseCommand):
    help = (
        "Build a tiny random Wan2.1 T2V + I2V pair (DIR/t2v, DIR/i2v) and two tiny LoRAs "
        "(DIR/loras/alpha.safetensors, beta.safetensors) offline, for tests and demos."
    )

    def add_arguments(self, parser):
        parser.add_argument("directory", type=Path)
        parser.add_argument("--force", action="store_true", help="rebuild even if present")

    def handle(self, *args, directory: Path, force: bool, **options):
        models = build_tiny_models(directory, force=force)
        for kind, path in models.items():
            self.stdout.write(f"{kind}: {path}")
        for name, seed in TINY_LORAS.items():
            lora_file = directory / "loras" / f"{name}.safetensors"
            if force or not lora_file.is_file():
                build_tiny_lora(models["t2v"], lora_file, seed=seed)
            self.stdout.write(f"lora {name}: {lora_file.resolve()}")
