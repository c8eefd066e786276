"""Running API requests on the AsyncLLM: a bounded queue, fan-in of a request's prompts,
latency metrics, and aborting the engine request the moment its client goes away."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from contextlib import aclosing
from typing import TypeVar

from starlette.requests import Request

from loopcoder.engine.llm import AsyncLLM
from loopcoder.outputs import RequestOutput
from loopcoder.sampling import SamplingParams
from loopcoder.server.errors import APIError
from loopcoder.server.inputs import EnginePrompt
from loopcoder.server.metrics import Metrics

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client hung up before its response was ready."""


class EngineClient:
    """Admits requests while fewer than `max_waiting` prompts wait for their first token."""

    def __init__(self, llm: AsyncLLM, metrics: Metrics, max_waiting: int) -> None:
        self.llm = llm
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.queued = 0

    def start(self, prompts: list[EnginePrompt], params: SamplingParams) -> Generation:
        """Admit a request and start its prompts, or refuse it with 503 when the queue is full."""
        if len(prompts) > self.max_waiting:
            raise APIError(400, f"a request may hold at most {self.max_waiting} prompts, got {len(prompts)}", param="prompt")
        if self.queued + len(prompts) > self.max_waiting:
            raise APIError(
                503, f"server is at capacity ({self.queued} prompts waiting); retry later",
                type_="server_error", code="server_overloaded", headers={"Retry-After": "1"},
            )
        return Generation(self, prompts, params)


class Generation:
    """One API request's engine requests; iterate for (prompt index, cumulative output).

    `close()` cancels every engine request still running, which aborts it and frees its
    blocks; it is synchronous so it also works from a cancelled task.
    """

    def __init__(self, client: EngineClient, prompts: list[EnginePrompt], params: SamplingParams) -> None:
        self._client = client
        self._outputs: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self._unfinished = len(prompts)
        self.arrival = time.monotonic()
        base = uuid.uuid4().hex
        client.queued += len(prompts)
        self._tasks = [
            asyncio.create_task(self._run(i, prompt, params, f"{base}-{i}")) for i, prompt in enumerate(prompts)
        ]

    async def _run(self, index: int, prompt: EnginePrompt, params: SamplingParams, request_id: str) -> None:
        metrics, client = self._client.metrics, self._client
        queued, last, out = True, None, None
        try:
            async with aclosing(client.llm.generate({"prompt_token_ids": prompt.token_ids}, params, request_id)) as stream:
                async for out in stream:
                    if queued:  # running now (a long prompt's first outputs are prefill chunks, no tokens yet)
                        client.queued -= 1
                        queued = False
                    if any(seq.token_ids for seq in out.outputs):
                        now = time.monotonic()
                        if last is None:
                            metrics.time_to_first_token.observe(now - self.arrival)
                        else:
                            metrics.inter_token_latency.observe(now - last)
                        last = now
                    self._outputs.put_nowait((index, out))
        except asyncio.CancelledError:
            metrics.finished.labels("abort").inc(params.n)
            raise
        except Exception as e:  # noqa: BLE001 - handed to whoever reads the outputs
            self._outputs.put_nowait((index, e))
        else:
            metrics.e2e_latency.observe(time.monotonic() - self.arrival)
            for seq in out.outputs:
                metrics.finished.labels(seq.finish_reason or "abort").inc()
        finally:
            if queued:
                client.queued -= 1

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next output of any prompt, or None once every prompt has finished."""
        if not self._unfinished:
            return None
        index, item = await self._outputs.get()
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._unfinished -= 1
        return index, item

    async def finals(self) -> dict[int, RequestOutput]:
        """Each prompt's finished output."""
        finals = {}
        while (item := await self.next()) is not None:
            if item[1].finished:
                finals[item[0]] = item[1]
        return finals

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, or raise ClientDisconnected as soon as the client hangs up.

    Starlette notices a disconnect only while it streams a response; a request still waiting
    for the engine would otherwise keep its place (and its blocks) for nobody.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
