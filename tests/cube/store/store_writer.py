"""Run as its own process by the durability tests: write records, print each acknowledged id.

    python store_writer.py JOURNAL MODE COUNT

Eight tasks insert records as fast as the journal takes them and print each id once its
insert has returned (is acknowledged). MODE ``forever`` keeps going until the test kills the
process; MODE ``exit`` calls ``os._exit`` after COUNT acknowledgements, never closing the
journal, so its WAL is left as a crash would leave it.
"""

from __future__ import annotations

import os
import sys

import trio
from store_kit import record

from cube.store import Journal


async def main(path: str, mode: str, count: int) -> None:
    journal = await Journal.connect(path)
    acknowledged = 0

    async def writer() -> None:
        nonlocal acknowledged
        while True:
            stored = await journal.insert(record())
            sys.stdout.write(stored.id + "\n")
            sys.stdout.flush()
            acknowledged += 1
            if mode == "exit" and acknowledged >= count:
                os._exit(0)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(writer)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
