"""``python -m polytask.experiments.bench attention`` (same as ``polytask bench attention``)."""
import sys

from polytask.experiments.bench import main

sys.exit(main(sys.argv[1:]))
