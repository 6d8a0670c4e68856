"""A SIGTERM that arrives just as ``main`` returns must not kill the process.

``main`` signals itself and returns without a checkpoint, so the signal is
still queued when the runtime removes its handlers. Expected: exit status 0.
"""

from __future__ import annotations

import os
import signal

import engine


async def main() -> str:
    os.kill(os.getpid(), signal.SIGTERM)
    return "done"


if __name__ == "__main__":
    print(f"engine.run returned {engine.run(main)!r}", flush=True)
