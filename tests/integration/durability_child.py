"""Child process of the durability test: writes events through the batching writer as fast as it can
and prints `ACK <n>` for each write the moment its acknowledgement arrives. The parent kills it."""

from __future__ import annotations

import asyncio
import sys

from kernel.settings import Settings
from server.stores import open_store
from storage.store import CandidateRecord, CompletionRecord, EventRecord, SessionStart


async def main(url: str) -> None:
    s = Settings()
    s.database.url = url
    store = await open_store(s)
    await store.start_session(SessionStart("dur", "durability"))
    await store.record_completion(
        CompletionRecord("dur-c", "dur", "durability", "p", [1], [CandidateRecord("x", [2], [-0.5])])
    )
    print("READY", flush=True)
    out = sys.stdout

    def ack(fut: asyncio.Future[object], n: int) -> None:
        if fut.exception() is None:
            out.write(f"ACK {n}\n")
            out.flush()

    in_flight: set[asyncio.Future[object]] = set()
    n = 0
    while True:
        while len(in_flight) < 256:
            fut = store.record_event(EventRecord("dur", "partial_accept", "dur-c", accepted_length=n))
            fut.add_done_callback(lambda f, n=n: ack(f, n))
            in_flight.add(fut)
            n += 1
        _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
