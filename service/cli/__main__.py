"""``python -m service.cli``: the ``refit`` command (how ``refit up`` restarts itself)."""

import sys

from service.cli.main import main

sys.exit(main())
