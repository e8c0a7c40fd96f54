"""benchmarks/many_adapters.py: the Zipf sampler, decile bucketing and arrivals (no engine),
and a slow end-to-end smoke (`--quick`: both servers, 12 adapters, 40 requests)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("many_adapters",
                                                  ROOT / "benchmarks" / "many_adapters.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["many_adapters"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


ma = _load()


def test_zipf_weights_sum_to_one_and_follow_the_power_law():
    w = ma.zipf_weights(200, 1.0)
    assert math.isclose(sum(w), 1.0)
    assert all(a > b for a, b in zip(w, w[1:]))  # strictly decreasing with rank
    assert math.isclose(w[0] / w[9], 10.0)  # p1 / p10 = 10^alpha
    assert math.isclose(ma.zipf_weights(50, 1.2)[0] / ma.zipf_weights(50, 1.2)[1], 2 ** 1.2)
    assert ma.zipf_weights(7, 0.0) == pytest.approx([1 / 7] * 7)


def test_parse_alpha():
    assert ma.parse_alpha("uniform") == 0.0
    assert [ma.parse_alpha(s) for s in ("0.8", "1.0", "1.2")] == [0.8, 1.0, 1.2]
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ValueError):
            ma.parse_alpha(bad)


def test_sampler_is_seeded_and_skewed():
    a = ma.sample_adapters(200, 5000, 1.0, seed=0)
    assert a == ma.sample_adapters(200, 5000, 1.0, seed=0)
    assert a != ma.sample_adapters(200, 5000, 1.0, seed=1)
    assert min(a) >= 0 and max(a) < 200
    c = Counter(a)
    # Zipf(1.0) over 200: p(rank 1) = 1 / H_200 ≈ 0.171; the top 20 take about 61%.
    assert 0.15 < c[0] / 5000 < 0.19
    assert 0.57 < sum(c[i] for i in range(20)) / 5000 < 0.65
    u = Counter(ma.sample_adapters(10, 10000, 0.0, seed=0))
    assert all(850 < u[i] < 1150 for i in range(10))  # uniform


def test_deciles():
    assert [ma.decile(i, 200) for i in (0, 19, 20, 179, 180, 199)] == [1, 1, 2, 9, 10, 10]
    assert Counter(ma.decile(i, 200) for i in range(200)) == {d: 20 for d in range(1, 11)}
    # Fewer than 10 adapters per decile, or fewer adapters than deciles: still 1..10, in order.
    d12 = [ma.decile(i, 12) for i in range(12)]
    assert d12[0] == 1 and d12[-1] == 10 and d12 == sorted(d12)
    assert [ma.decile(i, 5) for i in range(5)] == [1, 3, 5, 7, 9]
    with pytest.raises(ValueError):
        ma.decile(200, 200)


def test_by_decile_and_rarest():
    recs = [ma.Record("a00", 1, 0.0, 0.1 * (k + 1), 1.0) for k in range(100)]
    recs += [ma.Record("a190", 10, 0.0, 5.0, 6.0), ma.Record("a195", 10, 0.0, 2.0, 3.0)]
    r = ma.Result(wall_s=2.0, output_tokens=1632, records=recs)
    by = r.by_decile()
    assert set(by) == {1, 10}
    assert by[1] == (100, pytest.approx(10.0))  # nearest rank: the top of 100 values
    assert by[10] == (2, 5.0)
    assert ma.rarest(r) == (10, 5.0)
    assert ma.rarer_half(r) == 5.0
    assert r.tok_s == 816.0
    assert r.ttft(0.5, {1}) == pytest.approx(5.1)


def test_poisson_arrivals():
    t = ma.arrival_times(4000, 20.0, seed=3)
    assert t[0] == 0.0 and t == sorted(t) and t == ma.arrival_times(4000, 20.0, seed=3)
    assert 180 < t[-1] < 220  # 4000 arrivals at 20/s: about 200 s


def test_scrape_delta():
    before = {"loads_ok": 10.0, "cache_hits": 90.0, "resident": {}}
    after = {"loads_ok": 16.0, "cache_hits": 184.0, "resident": {"host": 3}}
    d = ma.scrape_delta(before, after, wall_s=30.0)
    assert d["loads"] == 6.0 and d["loads_per_min"] == 12.0
    assert d["hit_rate"] == pytest.approx(94 / 100)
    none = {"loads_ok": None, "cache_hits": None, "other_lora_loads": None, "resident": {}}
    assert ma.scrape_delta(none, none, 30.0)["loads_per_min"] is None  # vLLM's server: n/a
    reads0 = {**before, "reads_prefetched": 4.0, "reads_blocking": 2.0, "step_wait_s": 0.5}
    reads1 = {**after, "reads_prefetched": 14.0, "reads_blocking": 3.0, "step_wait_s": 0.75}
    d = ma.scrape_delta(reads0, reads1, 30.0)
    assert (d["reads_prefetched"], d["reads_blocking"], d["step_wait_s"]) == (10.0, 1.0, 0.25)
    assert ma.engine_reads([d, d]) == "10 / 1 (0.25)"
    assert ma.engine_reads([ma.scrape_delta(none, none, 30.0)]) == "n/a"


def test_parse_variant():
    assert ma.parse_variant("off=LORAPLEX_LORA_PREFETCH=false") == (
        "off", (sys.executable, {"LORAPLEX_LORA_PREFETCH": "false"}))
    assert ma.parse_variant("old=python=/x/bin/python,LORAPLEX_MAX_QUEUE=9") == (
        "old", ("/x/bin/python", {"LORAPLEX_MAX_QUEUE": "9"}))
    assert ma.parse_variant("p=OMP_WAIT_POLICY=PASSIVE")[1][1] == {"OMP_WAIT_POLICY": "PASSIVE"}
    for bad in ("off", "off=", "off=prefetch=0", "off=LORAPLEX_X", "off=A-B=1"):
        with pytest.raises(ValueError):
            ma.parse_variant(bad)


@pytest.mark.slow
@pytest.mark.engine
def test_quick_run_end_to_end(tmp_path, toy_model_dir):
    """Both servers, the four loads, the report (a few minutes on 2 CPUs)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "many_adapters.py"), "--quick",
         "--base", str(toy_model_dir), "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for line in ("| loraplex zipf |", "| vllm 1 adapter |", "rarest-decile",
                 "Zipf ÷ one adapter, loraplex"):
        assert line in out.stdout


def test_report_renders_every_table():
    import argparse

    def result(scale: float) -> ma.Result:
        recs = [ma.Record(f"a{i % 20:02d}", ma.decile(i % 20, 20), 0.01 * i, scale * (1 + i % 7),
                          scale * 9) for i in range(60)]
        return ma.Result(wall_s=10 * scale, output_tokens=960, records=recs, cpu_s=2.0,
                         metrics={"loads_per_min": None, "hit_rate": None, "resident": {}})

    res = {n: [result(s), result(s)] for n, s in (("loraplex zipf", 1.0), ("vllm zipf", 2.0),
                                                   ("loraplex 1 adapter", 1.0),
                                                   ("vllm 1 adapter", 1.0),
                                                   ("off zipf", 0.5))}
    a = argparse.Namespace(adapters=20, alpha="1.0", max_loras=8, max_cpu_loras=4, rate=None,
                           concurrency=8,
                           requests=60, ranks="8,16", max_tokens=16, rounds=2, warm_rounds=1)
    out = ma.report(a, res, "test machine", ma.EngineArgs(), 20, 1.0,
                    [f"a{i % 20:02d}" for i in range(60)])
    assert "| loraplex ÷ vLLM, Zipf: tok/s | 2.000 | ≥ 1.1 | 2.00 2.00 |" in out
    assert "| loraplex ÷ vLLM, Zipf: TTFT p99 | 0.500 | ≤ 0.8 |" in out
    assert "| 10 | a18–a19 |" in out
    assert "after the first wave" in out
    assert "would miss 100.0% of them" in out
    assert "| off ÷ loraplex, Zipf: tok/s | 2.000 | (variant) |" in out
    assert "| off zipf |" in out


def test_lru_misses_model():
    assert ma.lru_misses(["a", "b", "a", "b"], 2) == 0.0  # fits: a warm cache never misses
    assert ma.lru_misses(["a", "b", "c"], 2) == 1.0  # cyclic over capacity + 1: always misses
    assert ma.lru_misses(["a", "b", "a", "c"], 2) == 0.5  # pass 2: b, c miss; a twice hits
    # A pinned adapter always hits and leaves the others fewer places.
    assert ma.lru_misses(["a", "b", "c"], 2, pinned={"a"}) == pytest.approx(2 / 3)  # b, c: 1 place
    assert ma.lru_misses(["a", "b", "c"], 3, pinned={"a"}) == 0.0  # b, c: 2 places
    assert ma.lru_misses(["a", "b", "a", "b"], 2, pinned={"a"}) == 0.0


def test_all_at_once_streams():
    recs = [ma.Record("a00", 1, 0.0, 1.0, 1.01), ma.Record("a00", 1, 0.0, 0.2, 1.0),
            ma.Record("a01", 1, 0.0, 2.0, 2.0)]
    assert ma.Result(1.0, 48, recs).all_at_once() == 2
