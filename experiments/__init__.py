"""polytask experiments package."""

if not __name__.startswith("polytask."):  # the checkout's folder imported under its bare name
    raise ImportError(f"import polytask.{__name__}, not {__name__}: the package is installed as "
                      f"polytask.{__name__} (pip install -e .); a second copy under the bare "
                      "name would hold second copies of every registry")

