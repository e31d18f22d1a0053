"""`python -m dora_shapegen.vae.bench ...` is `dora bench ...`."""

import sys

from dora_shapegen.runtime import flush_denormals
from dora_shapegen.vae.bench.run import main

flush_denormals()  # an entry point (also `dora bench`): denormals slow the CPU several-fold
sys.exit(main())
