"""`python -m pipeline --input ... --output ...` runs the job, as `hrnet-beam run` does."""
import sys

from pipeline.cli import console

console.setup(console.level_from_argv(sys.argv[1:]))

from pipeline.cli.run import main  # pylint: disable=wrong-import-position

sys.exit(main(sys.argv[1:], prog="python -m pipeline"))
