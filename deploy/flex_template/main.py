"""Entry point of the Dataflow Flex Template: `ecgtok nightly` with the template's parameters.

The launcher passes every parameter as `--name=value` (plus Dataflow's own options such
as --project, --region, --temp_location); they go to `ecgtok nightly` unchanged.
"""

import logging
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("NO_GCE_CHECK", "true")
    logging.basicConfig(level=logging.INFO)
    from ecgtok.pipeline.nightly import main

    sys.exit(main(sys.argv[1:]))
