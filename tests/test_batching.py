"""Continuous batching (nanochat.batching): requests decoded together, each in its own rows at its own position,
stream exactly what each would alone (Engine.generate), whenever they join or leave."""
import itertools
import threading
import time

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from nanochat.batching import Batcher
from nanochat.engine import Engine
from tests.fixtures import fuzz
from tests.test_engine import BOS, PROMPT, TOK, one_thread, random_gpt, run, text  # noqa: F401 (one_thread: autouse)
from tests.test_static_decode import A_END, OUT_END, PY_END, PY_START, bigram_gpt, fake_graph  # noqa: F401 (fixture)

REQUESTS = [  # prompt, Engine.generate's keyword arguments
    (PROMPT, dict(num_samples=1, max_tokens=20, temperature=0.0)),
    (PROMPT[:5], dict(num_samples=2, max_tokens=25, temperature=1.0, top_k=20, seed=5)),
    (PROMPT + text(" and some more words"), dict(num_samples=1, max_tokens=12, temperature=0.8, top_p=0.9, seed=9)),
]


@pytest.fixture
def model():
    return random_gpt(depth=4, window_pattern="SSSL")  # windows of 8 tokens: rows cross them at different steps


def alone(model, prompt, kwargs, decode="static"):
    return run(Engine(model, TOK, decode=decode).generate(prompt, **kwargs))


def wait_until(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_concurrent_requests_stream_as_if_alone_and_share_steps(model):
    batcher = Batcher(Engine(model, TOK), rows=4)
    assert batcher.mode == "static"  # the CPU's eager default cannot batch rows at different positions
    try:
        with batcher.cond:  # held: all three join at the first step
            streams = [batcher.generate(prompt, **kwargs) for prompt, kwargs in REQUESTS]
        got = [run(s) for s in streams]
    finally:
        batcher.close()
    for (prompt, kwargs), g in zip(REQUESTS, got):
        assert g == alone(model, prompt, kwargs)
        assert len(g[0]) == kwargs["max_tokens"] and len({tuple(c) for c in g[0]}) > 3
    assert batcher.steps == 25 - 1  # one step per token of the longest request (its last token is never forwarded)
    assert batcher.rows_in_use == 0


def test_requests_from_threads_join_and_leave_a_running_batch(model, monkeypatch):
    """A request joins mid-way into another's batch; a closed stream frees its rows for a request waiting for them."""
    batcher = Batcher(Engine(model, TOK), rows=3)
    iteration = batcher._iteration
    monkeypatch.setattr(batcher, "_iteration", lambda arrivals: (time.sleep(0.005), iteration(arrivals)))  # >1 s for `first`
    first_kwargs = dict(num_samples=1, max_tokens=250, temperature=1.0, seed=1)  # all the room: it ends when closed
    long = (PROMPT, dict(num_samples=2, max_tokens=40, temperature=0.0))
    try:
        first = batcher.generate(PROMPT[:6], **first_kwargs)
        head = [next(first) for _ in range(5)]
        results = {}
        joiner = threading.Thread(target=lambda: results.update(joined=run(batcher.generate(REQUESTS[2][0], **REQUESTS[2][1]))))
        joiner.start()  # row 1: decodes next to `first`, which has 5 or more tokens out
        joiner.join(60)
        with batcher.cond:
            waiting = batcher.generate(long[0], **long[1])  # needs 2 rows: waits until `first` leaves
            assert batcher.rows_in_use == 1 and batcher.pending
        first.close()
        got_long = run(waiting)
    finally:
        batcher.close()
    assert results["joined"] == alone(model, *REQUESTS[2])
    assert got_long == alone(model, *long)
    assert head == list(zip(*alone(model, PROMPT[:6], dict(first_kwargs, max_tokens=5))))
    assert 5 <= first.request.generated < 250  # it left because its stream was closed


def test_tool_calls_take_the_step_ahead_back(fake_graph, monkeypatch):
    """On a graphed path the batch runs one step ahead of the host; a row whose tool forces its next tokens makes
    the step rerun, in every row, and the streams stay those of the eager path."""
    chain = [PROMPT[-1], *text("x"), PY_START, *text("2+3"), PY_END, OUT_END, *text("!"), A_END]
    model = bigram_gpt(chain)
    batcher = Batcher(Engine(model, TOK, decode="graph"), rows=4)
    assert batcher.mode == "graph"
    requests = [(PROMPT, dict(num_samples=n, max_tokens=40, temperature=0.0)) for n in (1, 2)] + \
        [(PROMPT[:4], dict(num_samples=1, max_tokens=30, temperature=1.0, seed=2))]
    try:
        with batcher.cond:
            streams = [batcher.generate(prompt, **kwargs) for prompt, kwargs in requests]
        got = [run(s) for s in streams]
    finally:
        batcher.close()
    for (prompt, kwargs), g in zip(requests, got):
        assert g == alone(model, prompt, kwargs, decode="eager")
    assert [0] in got[0][1] and [A_END] in got[0][0]  # forced tool output, then the end
    assert batcher.steps == (30 - 1) + 3  # a step ahead per token of the longest, and 3 reruns for the 3 forced tokens
    assert fake_graph.captures == 3  # a graph of 1, 2 and 4 rows, captured once


def test_a_graphed_batch_replays_the_smallest_graph_holding_the_rows_in_use(fake_graph):
    model = random_gpt(depth=2)
    batcher = Batcher(Engine(model, TOK, decode="graph"), rows=8)
    used = []
    try:
        run(batcher.generate(PROMPT, max_tokens=2, temperature=0.0))  # builds the decoder and its graphs
        assert sorted(batcher.graphs) == [1, 2, 4, 8]
        batcher.graphs = {k: (lambda k=k, g=g: (used.append(k), g())[1]) for k, g in batcher.graphs.items()}
        alone_got = run(batcher.generate(PROMPT, max_tokens=6, temperature=0.0))
        steps_alone, used[:] = list(used), []
        with batcher.cond:
            streams = [batcher.generate(PROMPT[:4 + i], max_tokens=6, temperature=1.0, seed=i) for i in range(3)]
        together = [run(s) for s in streams]
    finally:
        batcher.close()
    assert steps_alone == [1] * 5  # a lone request: the 1-row graph, as unbatched
    assert set(used) == {4}  # rows 0-2 in use: the 4-row graph
    assert alone_got == alone(model, PROMPT, dict(max_tokens=6, temperature=0.0), decode="eager")
    for i, got in enumerate(together):
        assert got == alone(model, PROMPT[:4 + i], dict(max_tokens=6, temperature=1.0, seed=i), decode="eager")


def test_an_eager_step_computes_only_the_rows_and_slots_in_use(model, monkeypatch):
    """Without a CUDA graph nothing needs fixed shapes: rows at different positions step the rows in use over the
    slots reached, behind a mask; rows all at one position (a lone request) step the rows in use at
    that position, told by the host (`at`: slices of the cache, no mask)."""
    batcher = Batcher(Engine(model, TOK), rows=8)
    calls = []
    try:
        run(batcher.generate(PROMPT, max_tokens=3, temperature=0.0))  # builds the decoder
        step = batcher.decoder.step

        def spy(ids, cache, cos, sin, at=None):
            calls.append((ids.size(0), cache.k[0].size(2), at))
            return step(ids, cache, cos, sin, at=at)
        monkeypatch.setattr(batcher.decoder, "step", spy)
        lone = run(batcher.generate(PROMPT, max_tokens=60, temperature=0.0))
        lone_calls, calls[:] = list(calls), []
        with batcher.cond:  # held: both join at the first step, at positions 12 and 4
            streams = [batcher.generate(PROMPT[:n], max_tokens=60, temperature=0.0) for n in (12, 4)]
        together = [run(s) for s in streams]
    finally:
        batcher.close()
    assert lone == alone(model, PROMPT, dict(max_tokens=60, temperature=0.0))
    assert batcher.max_len == 256 and len(PROMPT) == 12
    assert lone_calls == [(1, 256, 12 + t) for t in range(59)]  # (rows, cache slots, position): one row, told its position
    for n, got in zip((12, 4), together):
        assert got == alone(model, PROMPT[:n], dict(max_tokens=60, temperature=0.0))
    assert [c[1] for c in calls] == [13 + t for t in range(59)] and {c[::2] for c in calls} == {(2, None)}  # masked


ARRIVALS = st.lists(st.tuples(
    st.integers(0, 12),  # the scheduler iteration it is queued at: some join a running batch, some a later busy period
    st.text(alphabet="ab xyz.", max_size=30),  # prompt text, before the assistant's turn starts
    st.integers(1, 3),  # num_samples
    st.integers(1, 24),  # max_tokens
    st.sampled_from([dict(temperature=0.0), dict(temperature=0.8), dict(temperature=1.0, top_k=20),
                     dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=5, top_p=0.8)]),  # one sampling call each
    st.integers(0, 2**31 - 1)), min_size=1, max_size=6)  # seed


TOOL_CHAIN = [PROMPT[-1], *text("x"), PY_START, *text("2+3"), PY_END, OUT_END, *text("!"), A_END]


@pytest.mark.parametrize("weights,decode", [("random", "static"), ("tool calls", "static"), ("tool calls", "graph")])
def test_any_arrival_schedule_streams_what_each_request_would_alone(weights, decode, model, monkeypatch, request):
    """Random requests queued at random scheduler iterations, rows freed and reused, rows at one position (the
    host-position step) or at several (the masked step), on the CPU's uncaptured step or a graphed one that runs a step
    ahead (fake_graph), with random weights or ones that call the calculator (forced tokens take the step ahead back):
    each request streams exactly what Engine.generate gives it alone, from the same logits at every step (the tool-call
    weights follow their chain whatever the cache holds: only the logits show a cache gone wrong), and the batch ends
    with every row free."""
    import nanochat.engine as engine_mod
    from nanochat.engine import StaticDecoder
    if decode == "graph":
        request.getfixturevalue("fake_graph")
    if weights == "tool calls":
        model = bigram_gpt(TOOL_CHAIN)
    paths = {"run_at": 0, "run_window": 0}
    for name in paths:
        def counted(self, *args, _name=name, _method=getattr(StaticDecoder, name)):
            paths[_name] += 1
            return _method(self, *args)
        monkeypatch.setattr(StaticDecoder, name, counted)
    batched_logits, sample = {}, Batcher._sample  # request -> the logits each of its steps sampled from

    def recording_sample(self):
        for r in self.active:
            batched_logits.setdefault(r, []).append((r.logits if r.logits is not None else self.out[r.index]).clone())
        sample(self)
    monkeypatch.setattr(Batcher, "_sample", recording_sample)
    alone_logits, sample_next = [], engine_mod.sample_next_token

    def recording_sample_next(logits, *args, **kwargs):
        alone_logits.append(logits.clone())
        return sample_next(logits, *args, **kwargs)
    monkeypatch.setattr(engine_mod, "sample_next_token", recording_sample_next)

    @fuzz(30)
    @given(rows=st.integers(1, 4), arrivals=ARRIVALS)
    @example(rows=2, arrivals=[(0, "", 2, 12, dict(temperature=0.0), 0)])  # two rows at one position
    @example(rows=3, arrivals=[(0, "", 1, 12, dict(temperature=0.0), 0), (0, "ab", 1, 12, dict(temperature=1.0, top_k=20), 1),
                               (4, "x", 1, 8, dict(temperature=0.8), 2)])  # rows at several positions, one joining
    def check(rows, arrivals):
        requests = [(when, PROMPT[:-1] + text(extra) + PROMPT[-1:],  # the tool-call weights take over from <|assistant_start|>
                     dict(num_samples=min(n, rows), max_tokens=m, seed=seed, **sampling))
                    for when, extra, n, m, sampling, seed in arrivals]
        batcher = Batcher(Engine(model, TOK, decode=decode), rows=rows)
        streams, later = {}, {i: r for i, r in enumerate(requests)}
        iteration, take = itertools.count(), batcher._take_arrivals

        def queue_due(now):
            for i, (when, prompt, kwargs) in list(later.items()):
                if when <= now:
                    streams[i] = batcher.generate(prompt, **kwargs)
                    del later[i]

        def take_arrivals():  # in the scheduler thread, under batcher.cond (an RLock: generate() takes it again)
            queue_due(next(iteration))
            return take()
        batcher._take_arrivals = take_arrivals
        try:
            while later:  # the batch went idle before the next arrival's iteration: it starts the next busy period
                with batcher.cond:
                    queue_due(min(when for when, _, _ in later.values()))
                wait_until(lambda: batcher.thread is None)
            got = {i: run(s) for i, s in streams.items()}
            wait_until(lambda: batcher.thread is None)
            assert batcher.rows_in_use == 0 and not batcher.pending
        finally:
            batcher.close()
        for i, (_, prompt, kwargs) in enumerate(requests):
            alone_logits.clear()
            assert got[i] == alone(model, prompt, kwargs, decode="eager" if decode == "graph" else "static"), (i, requests)
            steps, columns = batched_logits.pop(streams[i].request), got[i][0]
            assert len(steps) == len(alone_logits) == len(columns)
            live = torch.ones(kwargs["num_samples"], dtype=torch.bool)  # a finished row's logits are nobody's
            for step, (b, a) in enumerate(zip(steps, alone_logits)):
                torch.testing.assert_close(b[live], a.expand_as(b)[live], rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"request {i} step {step} of {rows} rows, {requests}: {m}")
                live &= ~torch.tensor([t in (A_END, BOS) for t in columns[step]])
        if weights == "tool calls":
            tool_outputs[0] += sum(OUT_END in column for columns, _ in got.values() for column in columns)

    tool_outputs = [0]
    check()
    if decode == "static":
        assert paths["run_at"] > 0 and paths["run_window"] > 0  # both uncaptured steps ran, over the examples
    if weights == "tool calls":
        assert tool_outputs[0] > 0  # the calculator's forced output was streamed


def test_a_capture_that_fails_under_auto_falls_back_to_the_uncaptured_step(model, monkeypatch):
    """As Engine: a path picked by default (auto; here "graph", as on CUDA) must not stop decoding when it cannot build."""
    import nanochat.engine as engine_mod

    def broken(fn, warmup=2):
        raise RuntimeError("capture failed")
    monkeypatch.setattr(engine_mod, "CudaGraphStep", broken)
    engine = Engine(model, TOK)
    monkeypatch.setitem(engine_mod.AUTO_DECODE, "cpu", ("graph", "graph"))
    batcher = Batcher(engine, rows=2)
    assert batcher.mode == "graph"
    try:
        with pytest.warns(UserWarning, match="batched decode \\(graph\\) failed.*capture failed"):
            got = run(batcher.generate(PROMPT, max_tokens=8, temperature=0.0))
    finally:
        batcher.close()
    assert batcher.mode == "static" and got == alone(model, PROMPT, dict(max_tokens=8, temperature=0.0))
    chosen = Batcher(Engine(model, TOK, decode="graph"), rows=2)  # chosen, not auto: the error is the answer
    try:
        with pytest.raises(RuntimeError, match="batched decoding failed: RuntimeError: capture failed"):
            run(chosen.generate(PROMPT, max_tokens=3))
    finally:
        chosen.close()


def test_a_failing_step_fails_its_requests_and_the_next_ones_decode(model, monkeypatch):
    batcher = Batcher(Engine(model, TOK), rows=2)
    try:
        assert run(batcher.generate(PROMPT, max_tokens=3, temperature=0.0)) == alone(model, PROMPT, dict(max_tokens=3, temperature=0.0))
        step = batcher.decoder.step
        monkeypatch.setattr(batcher.decoder, "step", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("device lost")))
        with pytest.raises(RuntimeError, match="batched decoding failed: RuntimeError: device lost"):
            run(batcher.generate(PROMPT, max_tokens=5, temperature=0.0))
        monkeypatch.setattr(batcher.decoder, "step", step)
        assert run(batcher.generate(PROMPT, max_tokens=5, temperature=0.0)) == alone(model, PROMPT, dict(max_tokens=5, temperature=0.0))
        wait_until(lambda: batcher.rows_in_use == 0)
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.generate(PROMPT)


def test_arguments_are_checked_at_the_call(model):
    batcher = Batcher(Engine(model, TOK), rows=2)
    with pytest.raises(ValueError, match="num_samples"):
        batcher.generate(PROMPT, num_samples=3)
    with pytest.raises(ValueError, match="room for 1 to"):
        batcher.generate(PROMPT, max_tokens=batcher.max_len)
    with pytest.raises(ValueError, match="tokens"):
        batcher.generate([])
    with pytest.raises(ValueError, match="temperature"):
        batcher.generate(PROMPT, temperature=-1)
    assert batcher.thread is None  # nothing was queued
    with pytest.raises(TypeError, match="nanochat GPT"):
        Batcher(Engine(torch.nn.Linear(2, 2), TOK))


def test_an_idle_batch_holds_no_thread_and_decodes_with_the_current_weights(model):
    """The scheduler thread lives while there is work; the next busy period refreshes the weights from the parameters
    (chat_rl trains between batches), so a changed model decodes as a fresh engine over it would."""
    engine = Engine(model, TOK)
    batcher = engine.batcher(rows=2, max_len=len(PROMPT) + 20)
    kwargs = dict(max_tokens=20, temperature=0.0)
    before = alone(model, PROMPT, kwargs)
    assert run(batcher.generate(PROMPT, **kwargs)) == before
    wait_until(lambda: batcher.thread is None)
    decoder = batcher.decoder
    with torch.no_grad():  # as an optimizer step would: in place, the query/key/value weights the decoder stacks
        for block in model.transformer.h:
            block.attn.c_q.weight.mul_(-1.5)
            block.attn.c_v.weight.add_(0.05)
    changed = alone(model, PROMPT, kwargs)
    assert run(batcher.generate(PROMPT, **kwargs)) == changed != before
    assert batcher.decoder is decoder  # the same cache and steps, refreshed weights
    wait_until(lambda: batcher.thread is None)


def test_the_engine_keeps_its_batch_for_the_next_call_of_the_same_shape(model):
    engine = Engine(model, TOK)
    batcher = engine.batcher(rows=4, max_len=600)
    assert batcher.max_len == 768  # rounded up to the cache bucket
    assert engine.batcher(4, 700) is batcher and engine.batcher(4, 300) is batcher  # needs 512: 768 is within 2x
    assert engine.batcher(4, 200) is not batcher  # needs 256: 768 slots would be more than twice that
    assert engine.batcher(4, 800).max_len == 1024  # more than it holds
    assert engine.batcher(2, 800) is not engine.batcher(4, 800)
    kept = engine.batcher(4, 800)
    kept.close()
    assert engine.batcher(4, 800) is not kept
