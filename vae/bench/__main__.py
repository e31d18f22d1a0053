"""`python -m vae.bench ...` is `dora bench ...`."""

import sys

from vae.bench.run import main
from vae.local_attention import flush_denormals

flush_denormals()  # an entry point (also `dora bench`): denormals slow the CPU several-fold
sys.exit(main())
