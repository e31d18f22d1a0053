"""`python -m vae.bench ...` is `dora bench ...`."""

import sys

from vae.bench.run import main

sys.exit(main())
