"""Test environment: defaults for the variables ``lightx2v_site.settings`` reads, then those settings.

Tests run on PostgreSQL (``DATABASE_URL``), with a throw-away data folder and the tiny Wan model
that ``tests/conftest.py`` builds there. Worker subprocesses inherit this environment.
"""
import os
import tempfile
from pathlib import Path

_var_dir = Path(tempfile.mkdtemp(prefix="lightx2v-test-"))
_test_environment = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
    "SECRET_KEY": "test-secret-key-not-for-production",
    "DEBUG": "0",
    "ALLOWED_HOSTS": "testserver,localhost,127.0.0.1",
    "LIGHTX2V_VAR_DIR": str(_var_dir),
    "LIGHTX2V_MODEL_PATH": str(_var_dir / "tiny-model" / "t2v"),
    "LIGHTX2V_I2V_MODEL_PATH": str(_var_dir / "tiny-model" / "i2v"),
    "LIGHTX2V_INPUT_ROOTS": str(_var_dir / "inputs"),
    "LIGHTX2V_LORA_DIR": str(_var_dir / "tiny-model" / "loras"),
    "LIGHTX2V_DEVICE": "cpu",
    "STATIC_ROOT": str(_var_dir / "static"),
}
(_var_dir / "static").mkdir()  # whitenoise warns about a missing STATIC_ROOT
for _name, _value in _test_environment.items():
    os.environ.setdefault(_name, _value)

from lightx2v_site.settings import *  # noqa: E402,F403
