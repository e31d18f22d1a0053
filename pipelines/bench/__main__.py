"""`python -m dora_shapegen.pipelines.bench ...` is `dora bench-generation ...`."""

import sys

from dora_shapegen.pipelines.bench.run import main
from dora_shapegen.runtime import flush_denormals

flush_denormals()  # an entry point (also `dora bench-generation`): denormals slow the CPU several-fold
sys.exit(main())
