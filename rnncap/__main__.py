"""``python -m rnncap``: the ``rnncap`` command, for launchers that run modules
(``torchrun ... -m rnncap train --distributed``)."""
import sys

from .cli import main

sys.exit(main())
