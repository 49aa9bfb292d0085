"""Settings for the LightX2V video service.

Every setting that an operator may change is read from the environment here and nowhere else.
Defaults give a working single-machine demo (SQLite under ``var/``, tiny model built by ``make run``);
production sets ``DATABASE_URL`` (PostgreSQL), ``SECRET_KEY``, ``DEBUG=0`` and the model paths.
"""
import os
import re
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from inference.options import OPTION_NAMES, InferenceOptions
from lightx2v_site.storages import build_storages
from inference.sampling import SCHEDULERS

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("LIGHTX2V_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool) -> bool:
    """True for 1/true/yes/on, False for 0/false/no/off/empty; ``default`` when unset."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)


def env_paths(name: str, default: list[Path]) -> list[Path]:
    """A list of folders separated by ``os.pathsep`` (``:`` on Linux); set but empty: none."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [Path(part).expanduser() for part in raw.split(os.pathsep) if part]


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")
    SECRET_KEY = "insecure-local-development-key"  # noqa: S105 - only reachable with DEBUG on
ALLOWED_HOSTS = [h for h in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost").split(",") if h]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI / ReDoc assets served locally: no CDN needed
    "django_q",
    "tasks_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "tasks_app.middleware.refuse_nul_in_query",
    "tasks_app.middleware.api_paths_without_trailing_slash",
    "whitenoise.middleware.WhiteNoiseMiddleware",  # admin and /docs assets without a separate web server
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "lightx2v_site.urls"
WSGI_APPLICATION = "lightx2v_site.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# PostgreSQL in production and in tests; a SQLite file only for the zero-install local run.
if not os.environ.get("DATABASE_URL"):
    VAR_DIR.mkdir(parents=True, exist_ok=True)
# Connections persist for a minute. Without health checks (a SELECT 1 before each request's first
# query, a quarter of a status poll's database work) the first request on a connection broken by a
# database restart answers a retryable 503 and the connection is replaced: LIGHTX2V_DB_HEALTH_CHECKS=1
# trades that for the extra round trip.
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}",
        conn_max_age=60,
        conn_health_checks=env_bool("LIGHTX2V_DB_HEALTH_CHECKS", False),
    )
}
# The hottest statements (token check, status poll, a worker's claim and finish) are prepared once per
# connection on PostgreSQL (tasks_app.rows). A pooler in transaction mode needs that off (PgBouncer
# before 1.21, or without max_prepared_statements): LIGHTX2V_DB_PREPARE=0.
LIGHTX2V_DB_PREPARE = env_bool("LIGHTX2V_DB_PREPARE", True)
on_postgresql = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"  # lower case: not a setting
if on_postgresql:
    # Lets tasks_app.rows prepare its statements (Django's client-side-bound queries never are).
    # None turns preparing off for the whole connection, tasks_app.rows' explicit prepare=True included.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "prepare_threshold", 5 if LIGHTX2V_DB_PREPARE else None
    )
elif DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the worker write concurrently: transactions take the write lock when they
    # begin and wait for it (instead of failing "database is locked" when a read turns into a write),
    # and WAL lets reads go on meanwhile.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"transaction_mode": "IMMEDIATE", "timeout": 20, "init_command": "PRAGMA journal_mode=WAL;"}
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# django-q2 keeps cluster statistics (live workers) in the cache: it must be shared between the web
# server and the workers, so it lives in the database (``manage.py createcachetable``).
CACHES = {
    "default": {"BACKEND": "tasks_app.cache.ReconnectingDatabaseCache", "LOCATION": "lightx2v_cache"}
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", BASE_DIR / "staticfiles"))

# ---------------------------------------------------------------------------------------------
# The video service.
# ---------------------------------------------------------------------------------------------
LIGHTX2V_MODEL_PATH = os.environ.get("LIGHTX2V_MODEL_PATH", "")  # Wan2.1 T2V Diffusers directory
LIGHTX2V_I2V_MODEL_PATH = os.environ.get("LIGHTX2V_I2V_MODEL_PATH", "")  # Wan2.1 I2V directory
LIGHTX2V_DEVICE = os.environ.get("LIGHTX2V_DEVICE", "auto")  # auto | cpu | cuda | cuda:N
if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", LIGHTX2V_DEVICE):
    raise ImproperlyConfigured(f"LIGHTX2V_DEVICE must be auto, cpu, cuda or cuda:N, not {LIGHTX2V_DEVICE!r}")
# Speed options of the loaded pipeline (inference/options.py documents each value), validated here so a
# typo stops start-up: LIGHTX2V_ATTENTION_BACKEND, _COMPILE, _CACHE, _CACHE_THRESHOLD, _VAE_TILING,
# _VAE_DTYPE, _VAE_DECODE, _TEXT_CACHE_SIZE, _FP8.
try:
    LIGHTX2V_INFERENCE_OPTIONS = InferenceOptions.from_strings(
        {name: os.environ.get(f"LIGHTX2V_{name.upper()}", "") for name in OPTION_NAMES}
    )
except ValueError as exc:
    raise ImproperlyConfigured(str(exc)) from exc
# Worker start-up: "load" loads the pipeline before the first task; "full" also runs one denoising step
# at the default size (compiles kernels; worth it on a GPU with compile on); "off" loads on first use;
# "auto" is "full" on CUDA, else "load".
LIGHTX2V_WARM_UP = os.environ.get("LIGHTX2V_WARM_UP", "auto")
if LIGHTX2V_WARM_UP not in ("auto", "off", "load", "full"):
    raise ImproperlyConfigured("LIGHTX2V_WARM_UP must be auto, off, load or full")
# The MP4 is encoded while the VAE decodes ("on": on its own thread, fed each decoded chunk) or after
# it ("off"). "auto" is "on" unless the pipeline runs on the CPU, where the encoder would take cores
# from the decode (2 cores, tiny model: the decode slowed by more than the encode it hid).
LIGHTX2V_STREAM_ENCODE = os.environ.get("LIGHTX2V_STREAM_ENCODE", "auto")
if LIGHTX2V_STREAM_ENCODE not in ("auto", "on", "off"):
    raise ImproperlyConfigured("LIGHTX2V_STREAM_ENCODE must be auto, on or off")
# Finished videos: <output root>/videos/<task_id>.mp4, published as "outputs/videos/<task_id>.mp4".
LIGHTX2V_OUTPUT_ROOT = Path(os.environ.get("LIGHTX2V_OUTPUT_ROOT", VAR_DIR / "outputs"))
# Input images (uploads and data: URLs), stored under server-chosen names.
LIGHTX2V_UPLOAD_ROOT = Path(os.environ.get("LIGHTX2V_UPLOAD_ROOT", VAR_DIR / "uploads"))
# outputs + uploads (lightx2v_site/storages.py): LIGHTX2V_STORAGE=filesystem (the two roots above) or s3
# (LIGHTX2V_S3_BUCKET, optional LIGHTX2V_S3_ENDPOINT_URL for MinIO and the like).
try:
    FILE_STORAGES = build_storages(
        os.environ.get("LIGHTX2V_STORAGE", "filesystem"),
        output_root=LIGHTX2V_OUTPUT_ROOT,
        upload_root=LIGHTX2V_UPLOAD_ROOT,
        bucket=os.environ.get("LIGHTX2V_S3_BUCKET", ""),
        endpoint_url=os.environ.get("LIGHTX2V_S3_ENDPOINT_URL", ""),
    )
except ValueError as exc:
    raise ImproperlyConfigured(str(exc)) from exc
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    **FILE_STORAGES,
    # Gzipped copies at collectstatic; not the manifest variant, which needs collectstatic even in tests.
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Folders from which a request's ``image_path`` may name a file; set but empty = no server-side paths.
LIGHTX2V_INPUT_ROOTS = env_paths("LIGHTX2V_INPUT_ROOTS", [VAR_DIR / "inputs"])
LIGHTX2V_MAX_DURATION = env_int("LIGHTX2V_MAX_DURATION", 10)  # seconds
# Days after which a finished task's video, poster and input image are removed (the row stays); 0 = never.
LIGHTX2V_RETENTION_DAYS = env_float("LIGHTX2V_RETENTION_DAYS", 0)
# LoRA files (<name>.safetensors) a request may name in lora_name; listed in /v1/service/metadata.
LIGHTX2V_LORA_DIR = Path(os.environ.get("LIGHTX2V_LORA_DIR", VAR_DIR / "loras"))
# The sampler: "" keeps the model's own scheduler, else one of inference.sampling.SCHEDULERS.
LIGHTX2V_SCHEDULER = os.environ.get("LIGHTX2V_SCHEDULER", "")
if LIGHTX2V_SCHEDULER and LIGHTX2V_SCHEDULER not in SCHEDULERS:
    raise ImproperlyConfigured(f"LIGHTX2V_SCHEDULER must be empty or one of {', '.join(SCHEDULERS)}")
# A step-distilled model (4 steps, no CFG, as LightX2V ships) samples with flow shift 5 at every size;
# otherwise the default shift follows the resolution (3.0 up to 480p, 5.0 above).
LIGHTX2V_DISTILLED = env_bool("LIGHTX2V_DISTILLED", True)
LIGHTX2V_MAX_PIXELS = env_int("LIGHTX2V_MAX_PIXELS", 1280 * 720)  # height x width
LIGHTX2V_MAX_UPLOAD_BYTES = env_int("LIGHTX2V_MAX_UPLOAD_BYTES", 20 * 1024 * 1024)
LIGHTX2V_MAX_IMAGE_PIXELS = env_int("LIGHTX2V_MAX_IMAGE_PIXELS", 40_000_000)
LIGHTX2V_WORKERS = env_int("LIGHTX2V_WORKERS", 1)  # worker processes per qcluster (one per GPU)
# Wall-clock limit of one generation (after the model is loaded); over it the task ends "failed".
LIGHTX2V_TASK_TIMEOUT = env_int("LIGHTX2V_TASK_TIMEOUT", 3600)
# Leases: a running task's worker refreshes heartbeat_at every LIGHTX2V_HEARTBEAT_S; a task whose heartbeat
# is older than LIGHTX2V_LEASE_S is taken back by any worker's reaper and queued again; the
# LIGHTX2V_MAX_ATTEMPTS-th run lost since submit or an operator's retry fails it (hand-backs don't count).
LIGHTX2V_HEARTBEAT_S = env_float("LIGHTX2V_HEARTBEAT_S", 5)
# A running task's progress is written at most this often (and its statistics with it): what a poller
# can see, not one write per step. 0 writes every step. Cancelling still stops a run at its next step
# (PostgreSQL NOTIFY; on other databases at the next progress write).
LIGHTX2V_PROGRESS_INTERVAL_S = env_float("LIGHTX2V_PROGRESS_INTERVAL_S", 0.5)
LIGHTX2V_LEASE_S = env_float("LIGHTX2V_LEASE_S", 60)
LIGHTX2V_MAX_ATTEMPTS = env_int("LIGHTX2V_MAX_ATTEMPTS", 3)
# SIGTERM lets the running task finish for this long, then hands it back to the queue.
LIGHTX2V_SHUTDOWN_GRACE_S = env_float("LIGHTX2V_SHUTDOWN_GRACE_S", 60)
# Anonymous access is for local demos only: requests without a token act as this local user.
LIGHTX2V_ALLOW_ANONYMOUS = env_bool("LIGHTX2V_ALLOW_ANONYMOUS", False)
if LIGHTX2V_ALLOW_ANONYMOUS and not DEBUG:
    raise ImproperlyConfigured("LIGHTX2V_ALLOW_ANONYMOUS needs DEBUG on; never expose it on a network.")

# Resource limits. Over the per-user cap of unfinished (submitted + running) tasks a submit gets 429,
# over the global cap of queued tasks 503; both carry Retry-After.
LIGHTX2V_MAX_UNFINISHED_PER_USER = env_int("LIGHTX2V_MAX_UNFINISHED_PER_USER", 20)
LIGHTX2V_MAX_QUEUED = env_int("LIGHTX2V_MAX_QUEUED", 1000)
LIGHTX2V_RETRY_AFTER_S = env_int("LIGHTX2V_RETRY_AFTER_S", 30)
# How long an Idempotency-Key keeps returning its original task.
LIGHTX2V_IDEMPOTENCY_TTL_S = env_int("LIGHTX2V_IDEMPOTENCY_TTL_S", 24 * 3600)

# Request bodies: JSON and urlencoded ones (a data: URL image is base64 of up to LIGHTX2V_MAX_UPLOAD_BYTES)
# are capped at DATA_UPLOAD_MAX_MEMORY_SIZE (413, tasks_app.errors); multipart uploads are cut off by
# tasks_app.uploads as they stream in.
DATA_UPLOAD_MAX_MEMORY_SIZE = LIGHTX2V_MAX_UPLOAD_BYTES * 4 // 3 + 64 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_HANDLERS = [
    "tasks_app.uploads.SizeLimitedUploadHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]
DATA_UPLOAD_MAX_NUMBER_FIELDS = 100

# Webhooks (tasks_app/webhooks.py): retries back off from LIGHTX2V_WEBHOOK_BACKOFF_S, doubling, up to
# LIGHTX2V_WEBHOOK_MAX_ATTEMPTS; callback URLs to loopback/private addresses only with ALLOW_PRIVATE.
LIGHTX2V_WEBHOOK_ALLOW_PRIVATE = env_bool("LIGHTX2V_WEBHOOK_ALLOW_PRIVATE", False)
LIGHTX2V_WEBHOOK_MAX_ATTEMPTS = env_int("LIGHTX2V_WEBHOOK_MAX_ATTEMPTS", 8)
LIGHTX2V_WEBHOOK_BACKOFF_S = env_float("LIGHTX2V_WEBHOOK_BACKOFF_S", 2)
# Each worker process sends deliveries when one is announced (PostgreSQL NOTIFY), when a retry falls due,
# and at least this often anyway (the backstop; on other databases the only path, so shorter there).
LIGHTX2V_WEBHOOK_POLL_S = env_float("LIGHTX2V_WEBHOOK_POLL_S", 5.0 if on_postgresql else 0.5)

# /metrics (Prometheus): with a token, scrapers send "Authorization: Bearer <token>"; without one, only
# loopback clients are answered (bind a sidecar or scrape through the host).
LIGHTX2V_METRICS_TOKEN = os.environ.get("LIGHTX2V_METRICS_TOKEN", "")

# HTTPS deployment (LIGHTX2V_HTTPS=1 behind a TLS proxy): secure cookies, HSTS, redirect to https.
# `DEBUG=0 LIGHTX2V_HTTPS=1 SECRET_KEY=<50+ random chars> manage.py check --deploy` passes.
LIGHTX2V_HTTPS = env_bool("LIGHTX2V_HTTPS", False)
SECURE_SSL_REDIRECT = LIGHTX2V_HTTPS
SESSION_COOKIE_SECURE = LIGHTX2V_HTTPS
CSRF_COOKIE_SECURE = LIGHTX2V_HTTPS
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000) if LIGHTX2V_HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = LIGHTX2V_HTTPS
SECURE_HSTS_PRELOAD = LIGHTX2V_HTTPS
if env_bool("LIGHTX2V_BEHIND_PROXY", LIGHTX2V_HTTPS):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o]
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["tasks_app.authentication.BearerTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 20,
    "EXCEPTION_HANDLER": "tasks_app.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
    # JSON for every client; the browsable HTML API only for local development.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"]
    + (["rest_framework.renderers.BrowsableAPIRenderer"] if DEBUG else []),
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "tasks_app.negotiation.JsonUnlessAcceptable",
    "URL_FORMAT_OVERRIDE": None,  # ?format= is an ordinary (ignored) query parameter, not a 404
}
if LIGHTX2V_ALLOW_ANONYMOUS:
    REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"].append("tasks_app.authentication.LocalDemoAuthentication")

SPECTACULAR_SETTINGS = {
    "TITLE": "LightX2V video API",
    "DESCRIPTION": "Text-to-video and image-to-video generation with Wan2.1 models.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "tasks_app.schema.document_common_errors",
    ],
}

# django-q2: messages only say "there is work"; the VideoTask row is the truth (see tasks_app/worker.py).
# One message at a time per worker, no prefetch, and a retry longer than any run, so a message is
# never re-delivered while its run is still going (../shared/notes/django-q2.md).
Q_CLUSTER = {
    "name": "lightx2v",
    "orm": "default",
    # The ORM broker, woken by PostgreSQL NOTIFY when a task is queued (the poll below is the backstop).
    "broker_class": "tasks_app.wakeups.NotifyingORM",
    "workers": LIGHTX2V_WORKERS,
    "queue_limit": 1,
    "bulk": 1,
    # A backstop for a run that hangs outside the denoising loop (the loop enforces LIGHTX2V_TASK_TIMEOUT
    # itself and keeps the process); django-q2 then replaces the process. retry must exceed timeout.
    "timeout": LIGHTX2V_TASK_TIMEOUT + 600,
    "retry": LIGHTX2V_TASK_TIMEOUT + 1200,
    "max_attempts": 1,
    "ack_failures": True,
    "recycle": 100_000,
    "catch_up": False,
    "save_limit": 1000,
    "poll": 0.2,
    "label": "Worker queue",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
