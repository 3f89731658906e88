"""`python -m vdm_fast.train ...` and `torchrun --nproc_per_node=N -m vdm_fast.train ...`."""

import sys

from vdm_fast.train.cli import main

sys.exit(main())
