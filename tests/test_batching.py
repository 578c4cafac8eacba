"""Tensor batching and step-level continuous batching: each request's output equals its output alone.

Every case runs N different requests (prompts of different lengths, seeds, guidance scales, negative
prompts, step counts) through one Denoiser and compares each with the same request run alone, in
float32 on CPU. The DiT's forwards are counted, so a "batch" that secretly runs requests one by one
fails: compatible requests must share one forward per step.
"""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from diffgen import Engine
from diffgen.engine.batching import EVERY_REQUEST, BatchMember, ContinuousBatcher, StepPolicy
from diffgen.engine.request import GenerationRequest
from diffgen.errors import CancelledError, InvalidRequestError
from diffgen.pipelines.base import PipelineState
from diffgen.pipelines.denoiser import DenoisingRow

TOLERANCE = {"atol": 2e-5, "rtol": 1e-5}  # float32 rounding of batched matmuls (measured <= 2e-6)


def _image(width: int, height: int) -> Image.Image:
    pixels = torch.linspace(0, 255, width * height * 3).reshape(height, width, 3).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


# family -> (size and frame settings shared by the batch, the requests' own settings)
CASES = {
    "flux": ({"height": 32, "width": 48, "num_inference_steps": 3}, [
        {"prompt": "a red fox", "seed": 1, "guidance_scale": 3.5},
        {"prompt": "a very long prompt about a lighthouse on a cliff at dawn", "seed": 2, "guidance_scale": 6.0},
        {"prompt": "true cfg", "seed": 3, "negative_prompt": "blurry", "true_cfg_scale": 2.0},
    ]),
    "flux-schnell": ({"height": 32, "width": 32, "num_inference_steps": 2}, [
        {"prompt": "a cat", "seed": 4}, {"prompt": "a dog on a skateboard", "seed": 5},
    ]),
    "qwen-image": ({"height": 32, "width": 48, "num_inference_steps": 3}, [
        {"prompt": "short", "seed": 1},
        {"prompt": "a much longer prompt with many more tokens than the first one has", "seed": 2,
         "negative_prompt": "ugly", "true_cfg_scale": 4.0},
        {"prompt": "medium length prompt", "seed": 3, "negative_prompt": "a long negative prompt, blurry, dark",
         "true_cfg_scale": 2.5},
    ]),
    # Edits share a forward when their inputs have the same latent size (the input tokens ride in each row).
    "qwen-image-edit-2511": ({"num_inference_steps": 2}, [
        {"prompt": "make it blue", "seed": 1, "images": [_image(32, 32)]},
        {"prompt": "turn it into a watercolor painting", "seed": 2, "images": [_image(32, 32).rotate(90)],
         "negative_prompt": "dull", "true_cfg_scale": 3.0},
    ]),
    "wan-t2v": ({"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 3}, [
        {"prompt": "waves", "seed": 1, "guidance_scale": 5.0},
        {"prompt": "a bird flying over a lake", "seed": 2, "guidance_scale": 1.0},  # no CFG: one branch
        {"prompt": "rain", "seed": 3, "guidance_scale": 3.0, "negative_prompt": "sunny"},
    ]),
    "wan-i2v": ({"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}, [
        {"prompt": "it moves", "seed": 1, "images": [_image(32, 32)]},
        {"prompt": "it turns around slowly", "seed": 2, "images": [_image(40, 40)], "guidance_scale": 4.0},
    ]),
    # Two experts: with different step counts, rows sit on different experts at the same iteration.
    "wan22-a14b": ({"height": 32, "width": 32, "num_frames": 5}, [
        {"prompt": "a", "seed": 1, "num_inference_steps": 4, "guidance_scale": 4.0, "guidance_scale_2": 2.0},
        {"prompt": "b c d", "seed": 2, "num_inference_steps": 6, "guidance_scale": 3.0, "guidance_scale_2": 1.5},
    ]),
    "wan22-ti2v": ({"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}, [
        {"prompt": "text only", "seed": 1},
        {"prompt": "from a first frame", "seed": 2, "images": [_image(32, 32)]},
    ]),
    "fastwan-t2v": ({"height": 32, "width": 32, "num_frames": 5}, [
        {"prompt": "distilled", "seed": 1}, {"prompt": "three steps, fresh noise each", "seed": 2},
    ]),
    # Prompts keep their own text lengths (shared padding dropped): padded again with masked tokens.
    "hunyuan": ({"height": 32, "width": 48, "num_frames": 5, "num_inference_steps": 2}, [
        {"prompt": "a", "seed": 1, "guidance_scale": 3.0},
        {"prompt": "a much longer prompt than the first one", "seed": 2, "guidance_scale": 6.0,
         "negative_prompt": "low quality", "true_cfg_scale": 4.0},
    ]),
    "hunyuan15": ({"height": 48, "width": 80, "num_frames": 9, "num_inference_steps": 2}, [
        {"prompt": "short", "seed": 1, "guidance_scale": 1.0},
        {"prompt": 'a sign that says "OPEN" in a window, longer prompt', "seed": 2, "guidance_scale": 5.0,
         "negative_prompt": "blurry"},
    ]),
    # Step-distilled I2V: each row also embeds the end of its own step (timestep_r); no CFG.
    "hunyuan15-i2v-distilled": ({"num_frames": 9}, [
        {"prompt": "it moves", "seed": 1, "images": [_image(56, 40)], "num_inference_steps": 3},
        {"prompt": "it turns around, slowly", "seed": 2, "images": [_image(56, 40).rotate(180)],
         "num_inference_steps": 2},
    ]),
}


def _requests(family: str) -> list[GenerationRequest]:
    shared, own = CASES[family]
    return [GenerationRequest.build(**{**shared, **kwargs, "return_tensors": True}) for kwargs in own]


class ForwardCounter:
    """Counts the calls of the pipeline's DiT(s) and the rows each saw."""

    def __init__(self, pipe):
        self.calls, self.rows = 0, []
        self._handles = [model.register_forward_pre_hook(self._hook, with_kwargs=True)
                         for model in _dits(pipe)]

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.calls += 1
        self.rows.append(hidden.shape[0])

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _dits(pipe) -> list[torch.nn.Module]:
    return [pipe.components[name] for name in ("transformer", "transformer_2") if pipe.components.get(name) is not None]


def _alone(engine: Engine, request: GenerationRequest):
    return engine.submit(request).result()


@pytest.mark.parametrize("family", list(CASES))
def test_a_batch_of_different_requests_equals_each_alone(engines, family):
    engine = engines(family)
    requests = _requests(family)
    counter = ForwardCounter(engine.pipeline)
    try:
        alone = [_alone(engine, request) for request in requests]
        alone_calls, counter.calls, counter.rows = counter.calls, 0, []
        jobs = engine.submit_many(requests)
    finally:
        counter.remove()
    for job, expected in zip(jobs, alone, strict=True):
        result = job.result()
        torch.testing.assert_close(result.latents, expected.latents, **TOLERANCE)
        assert result.seed == expected.seed and set(result.timings) == set(expected.timings)
    # One forward per step for all of them (per expert in use at that step), never one per request or branch.
    steps = max(job.result().request.num_inference_steps for job in jobs)
    assert counter.calls <= steps * len(_dits(engine.pipeline)) and counter.calls < alone_calls, counter.rows
    assert max(counter.rows) >= len(requests), counter.rows


def test_fastwan_rows_share_the_forward(engines):
    engine = engines("fastwan-t2v")
    counter = ForwardCounter(engine.pipeline)
    try:
        engine.submit_many(_requests("fastwan-t2v"))
    finally:
        counter.remove()
    assert counter.rows == [2, 2, 2]  # 3 DMD steps, both requests in each forward


def test_hunyuan_video_i2v_declares_no_batching_and_runs_one_by_one(engines):
    engine = engines("hunyuan-i2v")
    requests = [GenerationRequest.build(prompt, seed=seed, images=[_image(48, 32)], height=32, width=48, num_frames=5,
                                        num_inference_steps=2, max_sequence_length=700, return_tensors=True)
                for prompt, seed in (("a", 1), ("b c", 2))]
    assert not engine.pipeline.supports_batching and engine.pipeline.batch_key(requests[0]) is None
    alone = [_alone(engine, request) for request in requests]
    counter = ForwardCounter(engine.pipeline)
    try:
        jobs = engine.submit_many(requests)
    finally:
        counter.remove()
    assert counter.rows == [1, 1, 1, 1]
    for job, expected in zip(jobs, alone, strict=True):
        assert torch.equal(job.result().latents, expected.latents)


def _member(request, outcomes, index, **kwargs) -> BatchMember:
    return BatchMember(str(index), request, on_done=lambda r: outcomes.__setitem__(index, r),
                       on_failed=lambda e: outcomes.__setitem__(index, e), **kwargs)


def _flux(steps: int, seed: int, prompt: str, **kwargs) -> GenerationRequest:
    return GenerationRequest.build(prompt, height=32, width=48, num_inference_steps=steps, seed=seed,
                                   return_tensors=True, **kwargs)


def test_a_request_joining_mid_flight_equals_itself_alone(engines):
    engine = engines("flux")
    long = _flux(6, 1, "a long request", guidance_scale=3.0)
    short = _flux(2, 2, "a short one that joins at step 2", guidance_scale=5.0)
    later = _flux(3, 3, "joins at step 3", negative_prompt="bad", true_cfg_scale=1.5)
    alone = [_alone(engine, r) for r in (long, short, later)]
    outcomes: dict[int, object] = {}
    batcher = ContinuousBatcher(engine.pipeline, max_batch_size=4)
    counter = ForwardCounter(engine.pipeline)
    try:
        batcher.add(_member(long, outcomes, 0))
        batcher.run_step()
        batcher.run_step()
        batcher.add(_member(short, outcomes, 1))
        batcher.run_step()
        batcher.add(_member(later, outcomes, 2))
        batcher.run_until_idle()
    finally:
        counter.remove()
    for index, expected in enumerate(alone):
        torch.testing.assert_close(outcomes[index].latents, expected.latents, **TOLERANCE)
    # long, long, long + short, long + short + later (2 branches; short leaves), long + later twice (both done)
    assert counter.rows == [1, 1, 2, 4, 3, 3], counter.rows
    assert outcomes[1].timings["denoising"] < outcomes[0].timings["denoising"]


def test_cancelling_one_request_leaves_the_others_unchanged(engines):
    engine = engines("qwen-image")
    requests = [GenerationRequest.build(prompt, height=32, width=32, num_inference_steps=4, seed=seed,
                                        return_tensors=True)
                for prompt, seed in (("one", 1), ("two, to be cancelled after two steps", 2), ("three", 3))]
    alone = {i: _alone(engine, requests[i]) for i in (0, 2)}
    cancel = threading.Event()
    seen: list[tuple[int, int]] = []
    outcomes: dict[int, object] = {}

    def progress(step: int, total: int, preview=None) -> None:
        seen.append((step, total))
        if step == 2:
            cancel.set()

    batcher = ContinuousBatcher(engine.pipeline, max_batch_size=3)
    batcher.add(_member(requests[0], outcomes, 0))
    batcher.add(_member(requests[1], outcomes, 1, progress=progress, is_cancelled=cancel.is_set))
    batcher.add(_member(requests[2], outcomes, 2))
    batcher.run_until_idle()
    assert isinstance(outcomes[1], CancelledError) and seen == [(1, 4), (2, 4)]
    for i in (0, 2):
        torch.testing.assert_close(outcomes[i].latents, alone[i].latents, **TOLERANCE)


def test_a_failed_batched_forward_is_retried_one_by_one_and_a_bad_request_fails_alone(engines):
    engine = engines("flux")
    good = [_flux(3, seed, f"prompt {seed}") for seed in (1, 2)]
    bad = _flux(3, 3, "bad", loras={"missing": 1.0})  # refused when prepared: no LoRA is loaded
    alone = [_alone(engine, r) for r in good]
    failures = []

    def out_of_memory(states):
        failures.append(len(states))
        raise torch.cuda.OutOfMemoryError("injected: the batch does not fit")

    outcomes: dict[int, object] = {}
    batcher = ContinuousBatcher(engine.pipeline, max_batch_size=4, before_batched_forward=out_of_memory)
    for index, request in enumerate((bad, *good)):
        batcher.add(_member(request, outcomes, index))
    batcher.run_until_idle()
    assert failures == [2]  # tried once together, then one by one until the batch drained
    assert isinstance(outcomes[0], InvalidRequestError) and outcomes[0].field == "loras"
    torch.testing.assert_close(outcomes[1].latents, alone[0].latents, **TOLERANCE)
    torch.testing.assert_close(outcomes[2].latents, alone[1].latents, **TOLERANCE)


def test_requests_that_cannot_share_a_forward_wait_their_turn(engines):
    engine = engines("flux")
    first, other_size, cached = _flux(2, 1, "a"), GenerationRequest.build(
        "b", height=48, width=48, num_inference_steps=2, seed=2, return_tensors=True), _flux(
        2, 3, "c", cache="first-block")
    assert engine.pipeline.batch_key(cached) is None
    assert engine.pipeline.batch_key(first) != engine.pipeline.batch_key(other_size)
    counter = ForwardCounter(engine.pipeline)
    try:
        jobs = engine.submit_many([first, other_size, cached])
    finally:
        counter.remove()
    assert counter.rows == [1] * 6 and all(job.result().latents is not None for job in jobs)


def test_the_step_callback_gets_each_request_s_latents(engines):
    engine = engines("flux")
    requests = [_flux(2, 1, "a"), _flux(3, 2, "b")]
    seen: dict[int, list] = {0: [], 1: []}
    outcomes: dict[int, object] = {}
    batcher = ContinuousBatcher(engine.pipeline, max_batch_size=2)
    for i, request in enumerate(requests):
        batcher.add(_member(request, outcomes, i,
                            step_callback=lambda step, total, latents, i=i: seen[i].append((step, total, latents))))
    batcher.run_until_idle()
    assert [(s, t) for s, t, _ in seen[0]] == [(1, 2), (2, 2)]
    assert [(s, t) for s, t, _ in seen[1]] == [(1, 3), (2, 3), (3, 3)]
    assert torch.equal(seen[1][-1][2], outcomes[1].latents) and seen[0][0][2].shape[0] == 1


class _RunningWorker:
    """Stands in for a worker process with the model loaded, running the jobs in ``batch``."""

    def __init__(self, capacity: int, key: tuple | None):
        self.index, self.ready, self.gone, self.load_error = 0, True, False, None
        self.batch: dict = {"running": object()}
        self.batch_id, self.batch_key, self.capacity = "b", key, capacity


def test_waiting_jobs_join_a_running_batch_until_the_oldest_waited_past_the_cap():
    from diffgen.engine.scheduler import ProcessExecutor

    scheduler = ProcessExecutor({"model_path": "unused"}, max_batch_size=4, batch_wait_cap=30.0)
    worker = _RunningWorker(capacity=4, key=None)
    scheduler._workers.append(worker)
    other = scheduler.submit(GenerationRequest.build("other size", height=64, width=64))
    joining = [scheduler.submit(GenerationRequest.build(f"s{i}", height=32, width=32, num_inference_steps=2 + i,
                                                        guidance_scale=1.0 + i)) for i in range(4)]
    worker.batch_key = joining[0].batch_key
    assert scheduler.options["max_batch_size"] == 4 and joining[0].batch_key == joining[3].batch_key
    with scheduler._lock:
        target, jobs = scheduler._next_dispatch()  # room for 3: the first three of its key, in order
        assert target is worker and [j.id for j in jobs] == [j.id for j in joining[:3]]
        for job in jobs:
            worker.batch[job.id] = job
        assert scheduler._next_dispatch() is None  # full
        worker.batch.pop(jobs[0].id)
        other.submitted_at -= 31  # the oldest waiting job (another size) has waited past the cap
        assert scheduler._next_dispatch() is None  # nobody joins any more: the batch drains for it
        worker.batch.clear()
        target, jobs = scheduler._next_dispatch()
    assert target is worker and [j.id for j in jobs] == [other.id]


# -- the step policy: which running requests a forward steps ----------------------------------------------
def _running(*steps: int) -> list[BatchMember]:
    """Members with schedules of ``steps`` steps, each with one step left."""
    members = []
    for i, total in enumerate(steps):
        member = BatchMember(str(i), GenerationRequest.build(f"r{i}"), on_done=print, on_failed=print)
        member.row = DenoisingRow(state=PipelineState(request=member.request, device=torch.device("cpu"),
                                                      dtype=torch.float32, seed=i, timesteps=torch.zeros(total)))
        member.row.index = total - 1
        members.append(member)
    return members


def test_the_policy_lets_requests_many_times_longer_than_the_shortest_sit_out_a_bounded_number_of_forwards():
    policy = StepPolicy(sit_out_ratio=4.0, max_sit_out=3)
    long_a, short, long_b, near = _running(50, 4, 17, 16)
    assert policy.choose([long_a, short, long_b, near]) == [short, near]  # 16 <= 4 x 4 < 17; in running order
    assert policy.choose([long_a, long_b]) == [long_a, long_b]  # 50 <= 4 x 17
    long_a.sat_out = 3  # left out of 3 forwards in a row: stepped now
    assert policy.choose([long_a, short, long_b, near]) == [long_a, short, near]
    assert EVERY_REQUEST.choose([long_a, short, long_b]) == [long_a, short, long_b]
    capped = StepPolicy(sit_out_ratio=None, max_requests=2)
    nine, three, five, one = _running(9, 3, 5, 1)
    nine.row.index, three.row.index, five.row.index = 0, 0, 4  # steps left: 9, 3, 1, 1
    assert capped.choose([nine, three, five, one]) == [five, one]  # the two nearest to done
    nine.sat_out = capped.max_sit_out
    assert capped.choose([nine, three, five, one]) == [nine, five]  # an overdue one goes first
    with pytest.raises(ValueError, match="sit_out_ratio"):
        StepPolicy(sit_out_ratio=0.5)


def test_a_short_request_among_long_ones_steps_alone_and_the_long_ones_are_not_starved(engines):
    engine = engines("flux")
    policy = StepPolicy(sit_out_ratio=2.0, max_sit_out=2)
    long = [_flux(8, seed, f"long request {seed}") for seed in (1, 2)]
    shorts = [_flux(2, 10 + i, f"short {i}") for i in range(4)]
    alone = [_alone(engine, r) for r in (*long, *shorts)]
    outcomes: dict[int, object] = {}
    stepped: list[set[int]] = []  # per forward: the requests it stepped

    def member(index: int, request: GenerationRequest) -> BatchMember:
        return _member(request, outcomes, index,
                       progress=lambda step, total, preview=None: stepped[-1].add(index))

    batcher = ContinuousBatcher(engine.pipeline, max_batch_size=8, policy=policy)
    for index, request in enumerate(long):
        batcher.add(member(index, request))
    while not batcher.idle:  # a new short request joins every second step until they are all in
        step = len(stepped)
        if step % 2 == 1 and step // 2 < len(shorts):
            batcher.add(member(2 + step // 2, shorts[step // 2]))
        stepped.append(set())
        batcher.run_step()
    for index, expected in enumerate(alone):
        torch.testing.assert_close(outcomes[index].latents, expected.latents, **TOLERANCE)
    # The long requests sat out while a short one ran (8 steps left > 2 x 2)...
    assert stepped[1] == {2} and stepped[2] == {2}, stepped
    # ...but never more than max_sit_out forwards in a row: each long request is stepped at least every third.
    for index in (0, 1):
        taken = [i for i, requests in enumerate(stepped) if index in requests]
        gaps = [b - a for a, b in zip([-1, *taken[:-1]], taken, strict=True)]
        assert len(taken) == 8 and max(gaps) <= policy.max_sit_out + 1, stepped


def test_every_request_policy_steps_all_running_requests_each_step(engines):
    engine = engines("flux")
    outcomes: dict[int, object] = {}
    batcher = ContinuousBatcher(engine.pipeline, max_batch_size=4, policy=EVERY_REQUEST)
    counter = ForwardCounter(engine.pipeline)
    try:
        batcher.add(_member(_flux(6, 1, "long"), outcomes, 0))
        batcher.run_step()
        batcher.add(_member(_flux(1, 2, "short"), outcomes, 1))
        batcher.run_until_idle()
    finally:
        counter.remove()
    assert counter.rows == [1, 2, 1, 1, 1, 1], counter.rows


# -- overlap: encoding and decoding on the stage thread while the loop steps the batch ---------------------
def test_with_overlap_a_request_is_encoded_while_the_batch_steps_and_outputs_are_unchanged(engines):
    engine = engines("flux")
    pipe = engine.pipeline
    first, second = _flux(6, 1, "the running one", guidance_scale=3.0), _flux(3, 2, "encoded beside it")
    alone = [_alone(engine, r) for r in (first, second)]
    stepped_meanwhile = threading.Event()
    threads: dict[str, set[str]] = {"prepare": set(), "finish": set()}
    prepare, finish = pipe.prepare, pipe.finish

    def slow_prepare(state):
        threads["prepare"].add(threading.current_thread().name)
        if state.request.prompt == second.prompt:  # it finishes only after the loop stepped the first one meanwhile
            assert stepped_meanwhile.wait(30), "the batch was not stepped while a request was being prepared"
        prepare(state)

    def traced_finish(state):
        threads["finish"].add(threading.current_thread().name)
        return finish(state)

    outcomes: dict[int, object] = {}
    batcher = ContinuousBatcher(pipe, max_batch_size=4, overlap=True)
    pipe.prepare, pipe.finish = slow_prepare, traced_finish
    try:
        batcher.add(_member(first, outcomes, 0))
        while batcher.running == []:
            batcher.run_step()
        batcher.add(_member(second, outcomes, 1,
                            on_start=lambda: batcher.running and _after_next_step(batcher, stepped_meanwhile)))
        batcher.run_until_idle()
    finally:
        batcher.close()
        del pipe.prepare, pipe.finish
    assert threads == {"prepare": {"batch-stages"}, "finish": {"batch-stages"}}
    for index, expected in enumerate(alone):
        torch.testing.assert_close(outcomes[index].latents, expected.latents, **TOLERANCE)


def _after_next_step(batcher: ContinuousBatcher, event: threading.Event) -> None:
    """Sets ``event`` once the running request's step count moves on (watched from the stage thread)."""
    row = batcher.running[0].row
    start = row.index

    def watch() -> None:
        while row.index == start and not row.done:
            threading.Event().wait(0.005)
        event.set()
    threading.Thread(target=watch, daemon=True).start()


def test_with_overlap_a_failing_encode_or_decode_fails_only_its_request_and_cancel_works(engines):
    engine = engines("flux")
    pipe = engine.pipeline
    good = [_flux(3, seed, f"good {seed}") for seed in (1, 2)]
    bad_encode = _flux(3, 3, "bad", loras={"missing": 1.0})  # refused when prepared: no LoRA is loaded
    bad_decode, cancelled = _flux(2, 4, "its decode fails"), _flux(4, 5, "cancelled after a step")
    alone = [_alone(engine, r) for r in good]
    cancel = threading.Event()
    finish = pipe.finish

    def failing_finish(state):
        if state.request.prompt == bad_decode.prompt:
            raise RuntimeError("injected decode failure")
        return finish(state)

    outcomes: dict[int, object] = {}
    batcher = ContinuousBatcher(pipe, max_batch_size=8, overlap=True)
    pipe.finish = failing_finish
    try:
        for index, request in enumerate((*good, bad_encode, bad_decode)):
            batcher.add(_member(request, outcomes, index))
        batcher.add(_member(cancelled, outcomes, 4, is_cancelled=cancel.is_set,
                            progress=lambda step, total, preview=None: cancel.set()))
        batcher.run_until_idle()
    finally:
        batcher.close()
        del pipe.finish
    assert isinstance(outcomes[2], InvalidRequestError) and outcomes[2].field == "loras"
    assert isinstance(outcomes[3], RuntimeError) and "injected decode failure" in str(outcomes[3])
    assert isinstance(outcomes[4], CancelledError)
    for index, expected in enumerate(alone):
        torch.testing.assert_close(outcomes[index].latents, expected.latents, **TOLERANCE)


def test_texts_are_concatenated_once_per_batch_membership_not_once_per_step(engines):
    engine = engines("qwen-image")  # prompts of different lengths: padded with masks when concatenated
    requests = [GenerationRequest.build(prompt, height=32, width=32, num_inference_steps=steps, seed=seed,
                                        return_tensors=True)
                for prompt, steps, seed in (("short", 4, 1), ("a much longer prompt than the first", 4, 2),
                                            ("joins later", 2, 3))]
    alone = [_alone(engine, r) for r in requests]
    outcomes: dict[int, object] = {}
    batcher = ContinuousBatcher(engine.pipeline, max_batch_size=4, policy=EVERY_REQUEST)
    built = batcher.denoiser.kept_inputs.built
    batcher.add(_member(requests[0], outcomes, 0))
    batcher.add(_member(requests[1], outcomes, 1))
    batcher.run_step()
    batcher.run_step()
    batcher.add(_member(requests[2], outcomes, 2))
    batcher.run_until_idle()
    for index, expected in enumerate(alone):
        torch.testing.assert_close(outcomes[index].latents, expected.latents, **TOLERANCE)
    # 4 batched steps in 2 memberships ({0, 1} for steps 1-2, {0, 1, 2} for steps 3-4): the latents are
    # concatenated at every step, the padded texts once per membership.
    assert built["hidden_states"] == 4 and built["encoder_hidden_states"] == 2, built
