"""The Engine's one interface: submit -> Job (progress, cancel, result), the same in-process and in workers."""

from __future__ import annotations

import numpy as np
import pytest

from diffgen.engine import Engine, GenerationRequest, JobError, read_model_spec
from diffgen.errors import CancelledError, InvalidRequestError


@pytest.fixture(scope="module")
def engine(tiny_flux):
    return Engine.from_pretrained(tiny_flux, device="cpu")


def _request(**kwargs) -> GenerationRequest:
    return GenerationRequest.build("a red fox", height=32, width=32, num_inference_steps=3, seed=1, **kwargs)


def test_in_process_job_reports_progress_and_gives_the_result(engine):
    events = []
    job = engine.submit(_request(), listener=lambda event, job: events.append((event, job.step, job.total_steps)))
    result = job.result()
    assert events == [("started", 0, 0), ("progress", 1, 3), ("progress", 2, 3), ("progress", 3, 3)]
    assert job.done() and result.images[0].size == (32, 32)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(engine.generate("a red fox", height=32, width=32,
                                                                                   num_inference_steps=3,
                                                                                   seed=1).images[0]))


def test_in_process_job_is_cancelled_between_steps(engine):
    def cancel_after_first_step(event, job):
        if event == "progress" and job.step == 1:
            assert job.cancel()

    job = engine.submit(_request(), listener=cancel_after_first_step)
    with pytest.raises(CancelledError):
        job.result()
    assert job.step == 1 and not job.cancel()  # finished: nothing left to cancel


def test_submit_resolves_before_any_work(engine):
    events = []
    with pytest.raises(InvalidRequestError, match="height: 40 is not a multiple of 16"):
        engine.submit(GenerationRequest.build("x", height=40), listener=lambda *a: events.append(a))
    assert events == []  # refused before it started


def test_workers_give_the_in_process_result(tiny_flux, engine):
    workers = Engine.with_workers(tiny_flux, device="cpu", max_queue=4)
    workers.start()
    try:
        assert workers.spec == engine.spec  # known before the worker has loaded anything
        assert workers.wait_loaded(timeout=300)
        events = []
        job = workers.submit(_request(), listener=lambda event, job: events.append(event))
        result = job.result(timeout=300)
        assert events[0] == "started" and events.count("progress") == 3
        expected = engine.submit(_request()).result()
        assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected.images[0]))
        assert result.request.images == [] and result.seed == 1
        with pytest.raises(InvalidRequestError):
            workers.submit(GenerationRequest.build("x", num_frames=5))  # refused in the front end
        status = workers.status()
        assert status.ready and status.queue_depth == 0 and status.device == "cpu"
    finally:
        workers.shutdown(timeout=10, grace=5)
    assert not workers.status().ready


def test_a_worker_job_cancelled_while_queued_fails_alone(tiny_flux):
    workers = Engine.with_workers(tiny_flux, device="cpu")  # not started: no worker takes the jobs
    workers.executor.spec = read_model_spec(tiny_flux)

    class Busy:  # a worker that has the model loaded and is busy: submissions wait in the queue
        ready, gone, batch_id, batch, load_error, pids, group = True, False, "busy", {}, None, [None], None

    workers.executor._workers.append(Busy())
    first, second = workers.submit(_request()), workers.submit(_request())
    assert first.cancel() and not second.done()
    with pytest.raises(JobError) as caught:
        first.result(timeout=5)
    assert caught.value.code == "cancelled" and workers.status().queue_depth == 1
