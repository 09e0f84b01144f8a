"""python -m dsvpn"""

import sys

from dsvpn.cli import main

sys.exit(main())
