"""`python -m fastllm`: the `fastllm` command."""

import sys

from fastllm.cli import main

sys.exit(main())
