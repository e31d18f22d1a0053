"""`python -m dora_shapegen.vae.bench ...` is `dora bench ...`."""

import sys

from dora_shapegen.vae.bench.run import main
from dora_shapegen.vae.local_attention import flush_denormals

flush_denormals()  # an entry point (also `dora bench`): denormals slow the CPU several-fold
sys.exit(main())
