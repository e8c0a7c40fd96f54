"""benchmarks/slot_sim.py: the step-level model of the closed loop against `max_loras` slots
(no engine; the gate policy runs the server's own SlotGate on the simulated clock)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import slot_sim as sim  # noqa: E402

SECOND = sim.StepModel(1000, 0)  # every step takes 1 s: times count steps


def run(adapters, policy="vllm", slots=8, concurrency=32, max_tokens=16, step=SECOND):
    return asyncio.run(sim.simulate(list(adapters), policy, slots, concurrency, max_tokens, step))


def test_one_adapter_runs_every_stream_every_step():
    out = run([0] * 320)
    assert out.per_step == 32 and out.steps == 10 * 16 and out.tokens == 320 * 16
    assert out.per_slot == 32  # one busy slot shared by all 32
    assert out.seconds == out.steps  # 1 s per step
    assert sorted(set(out.ttfts)) == [1.0]  # admitted on arrival, first token after one step


def test_two_adapters_one_slot_take_turns_by_hand():
    # Streams A and B; one slot; 2 tokens each. Steps 1-2: request 0 (a0); request 1 (a1) is
    # skipped. Stream A sends request 2 (a0) at t=2. Steps 3-4: request 1 (oldest); 5-6:
    # request 2; 7-8: request 3 (a1, sent at t=4).
    out = run([0, 1, 0, 1], slots=1, concurrency=2, max_tokens=2)
    assert out.steps == 8 and out.seconds == 8
    assert out.ttfts == [1.0, 3.0, 3.0, 3.0]
    assert out.per_step == 1


def test_vllm_rule_lets_a_resident_adapter_pass_the_queue_and_fcfs_does_not():
    # a0 runs; a1 waits for the only slot; a second a0 request arrives behind a1. vLLM's rule
    # admits it at once (its adapter has the slot); strict FCFS keeps it behind a1.
    seq = [0, 1, 0]
    vllm = run(seq, slots=1, concurrency=3, max_tokens=4)
    fcfs = run(seq, policy="fcfs", slots=1, concurrency=3, max_tokens=4)
    assert vllm.ttfts == [1.0, 1.0, 5.0]  # requests 0 and 2 (a0) together, then request 1
    assert fcfs.ttfts == [1.0, 5.0, 9.0]
    assert vllm.steps == 8 and fcfs.steps == 12


def test_slots_bound_the_batch_and_more_slots_lift_it():
    draw = sim.sample_adapters(200, 320, 1.0, 0)
    eight = run(draw)
    sixteen = run(draw, policy="slots:16")
    every = run(draw, policy="slots:32")
    assert eight.per_step < sixteen.per_step < every.per_step
    assert every.per_step == pytest.approx(32, rel=0.1)  # only the closing tail runs short
    assert eight.per_step < 16  # 8 adapters' requests of ~22 distinct in flight
    for out, slots in ((eight, 8), (sixteen, 16), (every, 32)):  # the slot inequality
        assert out.per_step <= slots * out.per_slot + 1e-9


def test_the_gate_policy_runs_the_servers_slot_gate_and_finishes():
    draw = sim.sample_adapters(50, 200, 1.0, 1)
    for pol in ("gate:0", "gate:0.5", "gate:1000"):
        out = run(draw, policy=pol, slots=4, concurrency=16, max_tokens=4,
                  step=sim.StepModel(10, 1))
        assert out.tokens == 200 * 4 and len(out.ttfts) == 200


def test_linger_and_reserve_hold_slots_for_adapters_that_have_no_request():
    # Two slots: a0 and a1 run at once, a2 waits. At t=2 both end and two a1 requests come.
    # vLLM's rule gives the freed slots to a2 (oldest: TTFT 3) and a1; with linger:3, a0's slot
    # stays held, a1 takes its own back, and a2 waits until the engine idles at t=4.
    seq = [0, 1, 2, 1, 1]
    assert run(seq, slots=2, concurrency=3, max_tokens=2).ttfts == [1.0, 1.0, 3.0, 1.0, 1.0]
    assert run(seq, policy="linger:3", slots=2, concurrency=3,
               max_tokens=2).ttfts == [1.0, 1.0, 1.0, 1.0, 5.0]
    # reserve:1 keeps a0's slot for good: with one slot, nothing else can ever run.
    with pytest.raises(RuntimeError, match="deadlocked"):
        run([1], policy="reserve:1", slots=1, concurrency=1, max_tokens=2)


def test_policy_and_step_model_parsing():
    assert sim.parse_policy("gate:2") == ("gate", 2.0)
    assert sim.parse_policy("slots:16") == ("slots", 16)
    assert sim.parse_policy("vllm") == ("vllm", None)
    for bad, msg in (("lru", "unknown policy"), ("gate", "needs a number"),
                     ("slots:0", ">= 1"), ("linger:1.5", "an integer"), ("fcfs:2", "no number")):
        with pytest.raises(ValueError, match=msg):
            sim.parse_policy(bad)
    m = sim.StepModel.parse("10,2")
    assert m(4, 2) == pytest.approx(0.018)
    assert sim.StepModel.parse("10,2,1.5")(4, 2) == pytest.approx(0.021)
    with pytest.raises(ValueError, match="t0,t1"):
        sim.StepModel.parse("10")
