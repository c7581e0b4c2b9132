"""``python -m experiments.bench attention`` (same as ``polytask bench attention``)."""
import sys

from experiments.bench import main

sys.exit(main(sys.argv[1:]))
