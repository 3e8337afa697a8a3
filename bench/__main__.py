"""`python -m bench`: the side-by-side benchmark."""

import sys

from bench.run import main

sys.exit(main())
