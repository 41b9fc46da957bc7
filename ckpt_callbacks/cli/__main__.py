"""`python -m ckpt_callbacks.cli`."""

import sys

from ckpt_callbacks.cli.commands import main

sys.exit(main())
