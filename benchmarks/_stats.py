"""What the benchmark scripts share for their figures (imported as ``_stats``: a
script's directory is ``sys.path[0]`` when it runs as ``python benchmarks/X.py``)."""

from __future__ import annotations


def percentile(values: list[float], p: float) -> float:
    """The ``p`` quantile (0 <= p <= 1) of ``values`` by rank: NaN for none."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]
