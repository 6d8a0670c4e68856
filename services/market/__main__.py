"""Entry point of ``python -m services.market``.

The streaming and batch paths of the service are not built yet; until they
are, this says so and exits with status 1 rather than pretending to run.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Print that the service is not built yet; return the exit status."""
    print(
        "services.market is not built yet: the engine foundation is in place, "
        "the market service (feed, broadcast, cycles, scans, orders) comes next.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
