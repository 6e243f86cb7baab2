"""``python -m aroma_peft`` is the ``aroma`` command."""

import sys

from .cli import main

sys.exit(main())
