"""AsyncEngine on its own: deltas, abort within one step, rejection, engine death, and a loop that never waits."""
import asyncio

import httpx
import pytest

from ironlm.engine.async_engine import AsyncEngine, EngineDeadError
from ironlm.errors import RequestError
from ironlm.sampling import SamplingParams
from test_server_support import FakeEngine, serve


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_generate_yields_deltas_until_finished():
    async def main():
        engine = AsyncEngine(FakeEngine())
        engine.start()
        outputs = [out async for out in engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=4))]
        await engine.shutdown()
        return outputs

    outputs = run(main())
    assert "".join(o.new_text for o in outputs) == "abcd"
    assert [o.finished for o in outputs] == [False, False, False, True]
    assert outputs[-1].finish_reason == "length"


def test_abort_frees_the_request_within_one_step():
    fake = FakeEngine(step_s=0.01)

    async def main():
        engine = AsyncEngine(fake)
        engine.start()
        stream = engine.generate("r", [1], SamplingParams(max_tokens=10_000))
        await anext(stream)
        await stream.aclose()  # what a client disconnect does
        steps_at_abort = fake.num_steps
        while "r" in fake.requests:
            await asyncio.sleep(0.001)
        steps_to_free = fake.num_steps - steps_at_abort
        await engine.shutdown()
        return steps_to_free

    assert run(main()) <= 1
    assert fake.num_aborted == 1


def test_rejected_request_raises_the_engine_error():
    async def main():
        engine = AsyncEngine(FakeEngine(max_model_len=8))
        engine.start()
        try:
            with pytest.raises(RequestError) as info:
                await anext(engine.generate("r", list(range(1, 20)), SamplingParams()))
            assert info.value.code == "context_length_exceeded"
            assert engine.num_requests == 0
            # the engine goes on serving
            outputs = [o async for o in engine.generate("s", [1], SamplingParams(max_tokens=2))]
            assert outputs[-1].finished
        finally:
            await engine.shutdown()

    run(main())


def test_engine_death_fails_open_and_new_requests():
    async def main():
        engine = AsyncEngine(FakeEngine(step_s=0.005, fail_at_step=3))
        engine.start()
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("r", [1], SamplingParams(max_tokens=100)):
                pass
        assert not engine.is_alive
        with pytest.raises(EngineDeadError):
            await anext(engine.generate("s", [1], SamplingParams()))
        await engine.shutdown()

    run(main())


def test_http_is_served_while_a_step_runs():
    fake = FakeEngine(step_s=1.0)
    server, _ = serve(fake)
    try:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                generation = asyncio.create_task(http.post(
                    "/v1/completions", json={"model": "default", "prompt": "a", "max_tokens": 2}))
                while fake.num_steps == 0:
                    await asyncio.sleep(0.01)
                step = fake.num_steps
                health = await http.get("/health")
                models = await http.get("/v1/models")
                assert fake.num_steps == step and fake.requests  # the first step has not finished yet
                assert health.status_code == 200 and models.status_code == 200
                assert (await generation).status_code == 200

        run(main())
    finally:
        server.stop()


def test_engine_death_answers_waiting_non_streaming_request_503():
    server, _ = serve(FakeEngine(step_s=0.01, fail_at_step=3))
    try:
        r = httpx.post(server.url + "/v1/completions", json={"model": "default", "prompt": "a", "max_tokens": 50},
                       timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        server.stop()
