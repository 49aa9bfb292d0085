"""WSGI entry point (gunicorn lightx2v_site.wsgi)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lightx2v_site.settings")
application = get_wsgi_application()
