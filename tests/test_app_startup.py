"""What an API process does once at startup, checked in-process (no server, no database)."""

import asyncio
import gc

from app.main import app, lifespan


def test_startup_heap_is_moved_out_of_the_collectors_generations():
    """Objects alive at startup (the app, its routes, the imported modules) are frozen: a full collection
    no longer walks them, which was the API's p99 (docs/performance.md)."""
    gc.unfreeze()
    alive_at_startup = [object()]  # a container, so the collector tracks it

    async def start_and_look():
        async with lifespan(app):
            return gc.get_freeze_count(), [any(o is alive_at_startup for o in gc.get_objects(g)) for g in range(3)]

    try:
        frozen, in_generations = asyncio.run(start_and_look())
    finally:
        gc.unfreeze()
    assert frozen > 10_000  # the whole app, not a handful of objects
    assert in_generations == [False, False, False]
