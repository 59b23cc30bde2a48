"""``python -m model_export.lab``: the same command as ``otel-ebpf-lab``."""

import sys

from .cli import main

sys.exit(main())
