"""Long runs (issue #17, item 5): many batches through one ProcessingEngine leak no memory.

200 batches of a year of daily candles through one engine and its two
workers. The resident memory of this process and the workers together
(``VmRSS``) is taken after a warm-up and again at the end; it must grow by
under 5 %.
"""

from __future__ import annotations

import datetime
import gc
import os

from services.market.candles import DateRange
from services.market.processing import FormulaService, ProcessingEngine, ProcessingJob
from tests.processing_support import SyntheticRepository, child_pids, rss_bytes

BATCHES = 200
WARMUP = 20
YEAR = DateRange(datetime.date(2024, 1, 1), datetime.date(2024, 12, 31))


def _rss(workers: set[int]) -> int:
    gc.collect()
    return rss_bytes({os.getpid(), *workers})


async def test_200_batches_through_one_engine_grow_rss_by_under_5_percent() -> None:
    job = ProcessingJob(
        [f"SYM{i}" for i in range(10)], "1d", YEAR, "rsi14 < 40 and close > sma50 or macd_hist > 1"
    )
    before = child_pids()
    # Forked workers start in milliseconds; what a batch does is the same as with spawn.
    processing = ProcessingEngine(SyntheticRepository(), FormulaService(), 2, start_method="fork")
    async with processing:
        assert processing.pool is not None
        await processing.pool.warm()
        workers = child_pids() - before
        assert len(workers) == 2
        matched = 0
        for number in range(1, BATCHES + 1):
            results = await processing.process_batch(job)
            assert len(results) == 10
            assert all(result.ok for result in results)
            matched += sum(len(result.matches) for result in results)
            if number == WARMUP:
                warm = _rss(workers)
        end = _rss(workers)
        assert child_pids() - before == workers  # the same two workers throughout
    growth = (end - warm) / warm
    print(
        f"RSS after {WARMUP} batches {warm / 2**20:.1f} MiB, after {BATCHES}"
        f" {end / 2**20:.1f} MiB: {growth:+.2%}"
    )
    assert matched > 0
    assert growth < 0.05
