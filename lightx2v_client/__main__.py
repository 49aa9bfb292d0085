"""``python -m lightx2v_client``."""
import sys

from .cli import main

sys.exit(main())
