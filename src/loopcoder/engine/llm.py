"""Drivers of the engine: `LLM` for offline batches, `AsyncLLM` for streaming servers."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Sequence

from loopcoder.engine.engine import LLMEngine, Prompt
from loopcoder.outputs import RequestOutput
from loopcoder.sampling import SamplingParams


class LLM:
    """vLLM's offline API: `LLM(path).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str | os.PathLike | None = None, dtype: str = "auto", device: str = "cpu", **engine_args) -> None:
        self.engine = LLMEngine(model, dtype=dtype, device=device, **engine_args)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched, and return outputs in prompt order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[i] for i in ids]


class AsyncLLM:
    """The engine stepping on a background thread; each request streams its outputs.

    Requests and aborts cross into the engine thread through a queue and are applied between
    steps; outputs come back to each request's asyncio queue on the caller's event loop.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="loopcoder-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str | os.PathLike | None = None, **kwargs) -> AsyncLLM:
        return cls(LLMEngine(model, **kwargs))

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._inbox.qsize()

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after each step it advances, the last one finished."""
        if self.error is not None:
            raise RuntimeError(f"engine stopped: {self.error}")
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, outputs)
        added = loop.create_future()
        self._inbox.put(("add", request_id, prompt, params, added))
        finished = False
        try:
            await added
            while not finished:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._inbox.put(("stop",))
        self._thread.join(timeout=30)
        self.engine.shutdown()

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._apply(block=not self.engine.has_unfinished())
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # noqa: BLE001 - every waiting stream must learn the engine died
            self.error = e
            for request_id in list(self._streams):
                self._deliver(request_id, RuntimeError(f"engine stopped: {e!r}"))
            self._refuse_until_stopped()

    def _refuse_until_stopped(self) -> None:
        """After a fatal engine error, fail every request still arriving instead of leaving it hanging."""
        while not self._stopped:
            try:
                item = self._inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if item[0] == "add":
                stream = self._streams.get(item[1])
                if stream is not None:
                    stream[0].call_soon_threadsafe(_settle, item[4], RuntimeError(f"engine stopped: {self.error!r}"))

    def _apply(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item[0] == "add":
                _, request_id, prompt, params, added = item
                self._add(request_id, prompt, params, added)
            elif item[0] == "abort":
                self.engine.abort(item[1])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, request_id: str, prompt: Prompt, params: SamplingParams, added: asyncio.Future) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        loop = stream[0]
        try:
            self.engine.add_request(prompt, params, request_id)
        except Exception as e:  # noqa: BLE001 - bad input goes back to the caller that sent it
            loop.call_soon_threadsafe(_settle, added, e)
            return
        loop.call_soon_threadsafe(_settle, added, None)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
