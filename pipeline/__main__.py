"""`python -m pipeline --input ... --output ...` runs the segmentation job."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.job import main  # pylint: disable=wrong-import-position

sys.exit(main(sys.argv[1:]))
