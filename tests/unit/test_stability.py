"""The spike guard (bigtx.stability): warm-up, window statistics, skip and rewind decisions, its saved
state, the rewind record; and the stability spec section's checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bigtx.checkpoint import spec_changes
from bigtx.config import SpecError, load_spec, spec_to_dict
from bigtx.config.spec import StabilitySection
from bigtx.stability import RewindRecord, SpikeGuard, StabilityStop, Verdict, read_record, write_record
from tests.unit.test_spec import run_cli


def guard(**fields: object) -> SpikeGuard:
    return SpikeGuard(StabilitySection(**{"window": 4, "warmup": 3, "loss_k": 1.0, "grad_norm_k": 1.0, **fields}))


def feed(g: SpikeGuard, values: list[tuple[float, float]], first_step: int = 1) -> list[Verdict]:
    return [g.judge(first_step + i, loss, norm).verdict for i, (loss, norm) in enumerate(values)]


def test_no_spike_during_the_warm_up() -> None:
    g = guard()
    assert feed(g, [(1.0, 1.0), (100.0, 100.0), (1e6, 1e6)]) == [Verdict.APPLY] * 3
    assert g.limits() is not None and g.skipped_spikes == 0


def test_the_limit_is_mean_plus_k_population_std_of_the_window() -> None:
    g = guard(loss_k=2.0, grad_norm_k=3.0)
    feed(g, [(1.0, 10.0), (2.0, 20.0), (3.0, 30.0)])
    std = math.sqrt(2 / 3)
    assert g.limits() == (2.0 + 2.0 * std, 20.0 + 3.0 * 10 * std)
    loss_limit, norm_limit = g.limits()
    assert g.judge(4, loss_limit, 20.0).verdict is Verdict.APPLY  # at the limit: not above it
    g = guard(loss_k=2.0, grad_norm_k=3.0)
    feed(g, [(1.0, 10.0), (2.0, 20.0), (3.0, 30.0)])
    assert g.judge(4, math.nextafter(loss_limit, math.inf), 20.0).verdict is Verdict.SKIP
    g = guard(loss_k=2.0, grad_norm_k=3.0)
    feed(g, [(1.0, 10.0), (2.0, 20.0), (3.0, 30.0)])
    decision = g.judge(4, 2.0, math.nextafter(norm_limit, math.inf))  # the gradient norm alone
    assert decision.verdict is Verdict.SKIP and decision.why.startswith("grad norm")


def test_a_spike_stays_out_of_the_window_and_is_counted() -> None:
    g = guard()
    feed(g, [(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)])
    before = g.saved()
    assert g.judge(4, 50.0, 2.0).verdict is Verdict.SKIP
    assert g.saved() == before | {"spikes": [4], "skipped_spikes": 1}
    assert g.metrics() == {"skipped_spikes": 1, "rewinds": 0, "skipped_batches": 0}


def test_the_window_keeps_the_newest_steps() -> None:
    g = guard(window=3, warmup=3)
    feed(g, [(100.0, 1.0), (1.0, 1.0), (2.0, 1.0), (3.0, 1.0)])
    assert list(g.losses) == [1.0, 2.0, 3.0]


def test_enough_spikes_within_the_span_rewind_to_before_the_first() -> None:
    g = guard(rewind_spikes=2, rewind_within=5)
    feed(g, [(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)])
    assert g.judge(10, 50.0, 2.0).verdict is Verdict.SKIP
    assert g.judge(15, 50.0, 2.0).verdict is Verdict.SKIP  # step 10 is out of the 5 steps 11..15
    decision = g.judge(19, 50.0, 2.0)
    assert (decision.verdict, decision.first_spike) == (Verdict.REWIND, 15)
    assert "spikes at steps 15, 19" in decision.why and g.skipped_spikes == 2


@pytest.mark.parametrize("loss, norm", [(math.nan, 1.0), (math.inf, 1.0), (1.0, math.inf), (1.0, math.nan)])
def test_a_non_finite_value_rewinds_at_once(loss: float, norm: float) -> None:
    g = guard()
    decision = g.judge(1, loss, norm)  # during the warm-up too
    assert (decision.verdict, decision.first_spike) == (Verdict.REWIND, 1)
    g = guard()
    feed(g, [(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)])
    g.judge(6, 50.0, 2.0)
    assert g.judge(8, loss, norm).first_spike == 6  # back to before the spike that came first


def test_saved_state_survives_json_and_decides_alike() -> None:
    values = [(1.0 + 0.1 * i, 2.0 - 0.05 * i) for i in range(7)] + [(9.0, 1.0), (1.3, 1.7), (1.2, 1.8)]
    a = guard(window=5)
    feed(a, values[:6])
    b = guard(window=5)
    b.restore(json.loads(json.dumps(a.saved())))
    assert b.saved() == a.saved()
    assert feed(a, values[6:], 7) == feed(b, values[6:], 7)
    assert a.saved() == b.saved() and Verdict.SKIP in feed(guard(window=5), values)


def test_restoring_into_a_smaller_window_keeps_the_newest() -> None:
    a = guard(window=4, loss_k=100.0, grad_norm_k=100.0)
    assert feed(a, [(1.0, 1.0), (2.0, 2.0), (3.0, 3.0), (4.0, 4.0)]) == [Verdict.APPLY] * 4
    b = guard(window=3, warmup=3)
    b.restore(a.saved())
    assert list(b.losses) == [2.0, 3.0, 4.0]


def test_a_rewind_that_cannot_happen_says_why() -> None:
    g = guard(max_rewinds=1)
    g.check_rewind(7, 4)
    with pytest.raises(StabilityStop, match="no complete checkpoint before step 7.*checkpoint.every_steps"):
        g.check_rewind(7, None)
    g.rewinds = 1
    with pytest.raises(StabilityStop, match="stability.max_rewinds: the run needs rewind 2 .* 1 are allowed"):
        g.check_rewind(7, 4)


def test_rewind_records_accumulate_the_skip_for_the_same_checkpoint(tmp_path: Path) -> None:
    g = guard(skip_batches=5)
    g.skipped_spikes = 2
    assert read_record(tmp_path) is None
    first = RewindRecord.after(g, tmp_path / "step_00000008", None)
    assert first == RewindRecord("step_00000008", 5, 1, 2, 5)
    write_record(tmp_path, first)
    assert read_record(tmp_path) == first
    first.apply(g)
    assert g.metrics() == {"skipped_spikes": 2, "rewinds": 1, "skipped_batches": 5}
    # back to the same checkpoint: past the data the first rewind skipped, and 5 batches more
    assert RewindRecord.after(g, tmp_path / "step_00000008", first) == RewindRecord("step_00000008", 10, 2, 2, 10)
    # to another one: 5 batches from there
    assert RewindRecord.after(g, tmp_path / "step_00000012", first) == RewindRecord("step_00000012", 5, 2, 2, 10)


def test_the_section_is_off_unless_given() -> None:
    assert load_spec("tiny").stability is None
    on = load_spec("tiny", ["stability.max_rewinds=1"]).stability
    assert on is not None and (on.window, on.warmup, on.skip_batches, on.max_rewinds) == (100, 20, 200, 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stability.warmup=30", "stability.window=10"], "stability.warmup: 30 exceeds stability.window=10"),
        (["stability.window=100", "precision=fp16"], "stability: not with precision=fp16"),
        (["stability.window=100", "zero.offload_optimizer=true"], "stability: not with zero.offload_optimizer=true"),
        (["stability.loss_k=0"], "stability.loss_k: Input should be greater than 0"),
        (["stability.grad_norm_k=nan"], "stability.grad_norm_k"),
        (["stability.warmup=1"], "stability.warmup: Input should be greater than or equal to 2"),
        (["stability.rewind_spikes=0"], "stability.rewind_spikes: Input should be greater than or equal to 1"),
        (["stability.skip_batches=-1"], "stability.skip_batches: Input should be greater than or equal to 0"),
        (["stability.max_rewind=2"], "stability.max_rewind: unknown field"),
    ],
)
def test_bad_stability_fields_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec("tiny", overrides)
    assert any(message in e for e in info.value.errors), info.value.errors
    args = [arg for o in overrides for arg in ("--set", o)]
    res = run_cli("config", "validate", "tiny", *args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_a_resumed_run_may_turn_the_section_on_off_or_retune_it() -> None:
    off = spec_to_dict(load_spec("tiny"))
    on = spec_to_dict(load_spec("tiny", ["stability.window=50", "stability.warmup=10"]))
    retuned = spec_to_dict(load_spec("tiny", ["stability.window=80", "stability.loss_k=4"]))
    for old, new in ((off, on), (on, off), (on, retuned)):
        assert spec_changes(old, new) == ([], [])
