"""An OpenAPI fuzz pass: schemathesis sends valid and invalid requests to every route of a
real server; none may answer 5xx, and the server must still be healthy afterwards.

Bounded by examples per route and by a wall-clock budget; the server's context is short so a
generated request never runs long.
"""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from server_fixtures import ServerProcess, write_checkpoint

EXAMPLES = 10
BUDGET_S = 30.0


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    checkpoint = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "fuzz-model")
    server = ServerProcess(
        checkpoint, tmp_path_factory.mktemp("logs") / "fuzz.log",
        "--max-model-len", "128", "--max-num-seqs", "64", "--log-level", "warning",
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


class OutOfTime(Exception):
    """Stops hypothesis at once: generating the rest of the examples would cost time too."""


def test_fuzz_finds_no_server_error(fuzz_server):
    url = fuzz_server.url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    deadline = time.monotonic() + BUDGET_S
    failures: list[str] = []
    calls = 0
    runs = [
        (result.ok(), mode)
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
        for result in schema.get_all_operations()
    ]
    for operation, mode in runs:

        @settings(
            max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(operation.as_strategy(generation_mode=mode))
        def call(case):
            nonlocal calls
            if time.monotonic() > deadline:
                raise OutOfTime
            calls += 1
            response = case.call(base_url=url, timeout=60)
            if response.status_code >= 500:
                failures.append(f"{case.operation.label} -> {response.status_code}: {case.body!r}: {response.text[:300]}")

        try:
            call()
        except Unsatisfiable:
            pass  # no invalid request exists for a route without parameters
        except OutOfTime:
            break
    assert not failures, "\n".join(failures[:5])
    assert calls >= 40
    assert httpx.get(f"{url}/health").status_code == 200
    assert "Traceback" not in fuzz_server.log.read_text()
