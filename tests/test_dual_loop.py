"""Algorithm 1 driven by scripted norm and ratio sequences; expected transitions worked out by hand."""

import math

import pytest

from aroma_peft import DualLoop


class Script:
    """Serves scripted values: ``norms[i]`` / ``ratios[i]`` are consumed in order, and every call is logged."""

    def __init__(self, norms=None, ratios=None):
        self.norms = {i: list(v) for i, v in (norms or {}).items()}
        self.ratios = {i: list(v) for i, v in (ratios or {}).items()}
        self.norm_calls, self.ratio_calls = [], []

    def norm(self, loop):
        def f(indices):
            self.norm_calls.append((loop.step_count, list(indices)))
            return [self.norms[i].pop(0) for i in indices]
        return f

    def ratio(self, loop):
        def f(indices):
            self.ratio_calls.append((loop.step_count, list(indices)))
            return [self.ratios[i].pop(0) for i in indices]
        return f


def make_loop(n=2, **kw):
    args = dict(eps_in=0.1, check_interval=2, max_inner_steps=10, eps_out=0.5, max_steps=100)
    args.update(kw)
    return DualLoop(n, **args)


def run(loop, script, steps):
    return [loop.step(script.norm(loop), script.ratio(loop)) for _ in range(steps)]


def test_inner_convergence_waits_for_all_then_outer_check():
    # Hand-worked: checks at t=2,4,6 (ΔT_in=2).
    #  module 0 norms 1.0 (first check: +inf change), 1.05 (+5% < 10%: converged at t=4), 3.0 (keeps training)
    #  module 1 norms 1.0, 2.0 (+100%), 2.1 (+5%: converged at t=6) -> all converged: inner loop ends at step 6.
    #  eq. (6): module 0 ratio 0.1 < 0.5 -> converged (frozen); module 1 ratio 0.9 -> merged.
    loop = make_loop()
    s = Script(norms={0: [1.0, 1.05, 3.0], 1: [1.0, 2.0, 2.1]}, ratios={0: [0.1], 1: [0.9]})
    decisions = run(loop, s, 6)
    assert [d.inner_end for d in decisions] == [False] * 5 + [True]
    assert decisions[-1].ended_by_eq5  # every module held eq. (5), before T_in = 10
    assert s.norm_calls == [(2, [0, 1]), (4, [0, 1]), (6, [0, 1])]  # module 0 keeps training while it waits
    assert s.ratio_calls == [(6, [0, 1])]
    last = decisions[-1]
    assert last.converged == [0] and last.merged == [1] and not last.finished
    assert loop.modules[0].converged and loop.modules[0].components == 0 and loop.modules[0].finished_at == 6
    assert loop.modules[1].components == 1 and loop.modules[1].active
    assert loop.inner_step == 0 and loop.outer_step == 2 and loop.restart_step == 6
    assert loop.active() == [1]


def test_first_check_never_converges_even_if_norm_shrinks_later():
    # The first check compares against ||b^(0) a^(0)|| = 0: never converged. A falling norm is a
    # negative (signed) change, below eps_in: converged.
    loop = make_loop(n=1, max_inner_steps=100)
    s = Script(norms={0: [5.0, 4.0]}, ratios={0: [0.9]})
    d = run(loop, s, 4)
    assert d[1].checked == [0] and not d[1].inner_end
    assert loop.modules[0].last_change == pytest.approx(-0.2)
    assert d[3].inner_end and d[3].merged == [0]  # change (4 - 5) / 5 = -0.2 < 0.1
    assert d[3].step == 4


def test_inner_cap_ends_the_loop_without_convergence():
    # Norms double at every check: never inner-converged; T_in = 10 ends the inner loop at step 10.
    loop = make_loop(n=1)
    s = Script(norms={0: [1, 2, 4, 8, 16]}, ratios={0: [0.9]})
    d = run(loop, s, 10)
    assert [x.inner_end for x in d] == [False] * 9 + [True]
    assert d[-1].merged == [0] and loop.modules[0].components == 1
    assert not d[-1].ended_by_eq5


def test_eq5_holding_at_the_cap_ends_the_loop_by_eq5():
    # T_in = 4, ΔT_in = 2: the check at t = 4 finds +5% < 10%, on the step the cap falls on too.
    # One module still growing at that check: the cap, not eq. (5), ends the loop.
    by_eq5 = run(make_loop(n=1, max_inner_steps=4), Script(norms={0: [1.0, 1.05]}, ratios={0: [0.9]}), 4)
    by_cap = run(make_loop(n=2, max_inner_steps=4),
                 Script(norms={0: [1.0, 1.05], 1: [1.0, 2.0]}, ratios={0: [0.9], 1: [0.9]}), 4)
    assert by_eq5[-1].inner_end and by_eq5[-1].ended_by_eq5
    assert by_cap[-1].inner_end and not by_cap[-1].ended_by_eq5


def test_cap_between_checks():
    # T_in = 5 with ΔT_in = 2: checks at t=2,4; the cap ends the loop at t=5, a non-check step.
    loop = make_loop(n=1, max_inner_steps=5)
    s = Script(norms={0: [1, 2]}, ratios={0: [0.9]})
    d = run(loop, s, 5)
    assert d[4].inner_end and s.norm_calls == [(2, [0]), (4, [0])]


def test_nan_norm_never_converges_and_nan_ratio_is_an_error():
    loop = make_loop(n=1, max_inner_steps=4)
    s = Script(norms={0: [1.0, math.nan]}, ratios={0: [math.nan]})
    run(loop, s, 3)
    assert not loop.modules[0].inner_converged
    with pytest.raises(FloatingPointError, match=r"module #0: the ratio of eq\. \(6\) is nan at step 4"):
        run(loop, s, 1)


def test_an_infinite_ratio_is_not_converged_and_merges():
    # outer_criterion="update" before the first merge: nothing to compare with, so the module merges.
    loop = make_loop(n=1, max_inner_steps=4)
    d = run(loop, Script(norms={0: [1.0, 1.0]}, ratios={0: [math.inf]}), 4)
    assert d[3].merged == [0] and not d[3].converged and loop.modules[0].last_ratio is None


def test_all_converged_finishes_before_max_steps():
    loop = make_loop(n=2, max_steps=1000)
    s = Script(norms={0: [1, 1], 1: [1, 1]}, ratios={0: [0.1], 1: [0.2]})
    d = run(loop, s, 4)
    assert d[-1].converged == [0, 1] and d[-1].finished and loop.finished
    with pytest.raises(RuntimeError, match="already finished at step 4"):
        run(loop, s, 1)


def test_heads_remaining_keep_going_until_max_steps():
    loop = make_loop(n=1, max_steps=8, stop_when_converged=False)
    s = Script(norms={0: [1, 1]}, ratios={0: [0.1]})
    d = run(loop, s, 8)
    assert d[3].converged == [0] and not d[3].finished
    assert [x.finished for x in d[4:]] == [False, False, False, True]
    assert s.norm_calls == [(2, [0]), (4, [0])]  # nothing left to check after convergence


def test_max_steps_keeps_live_components_that_trained():
    # Hand-worked: T_in = 4, T = 10. Merges at steps 4 and 8; at T = 10 the live component has
    # trained for 2 steps: kept (components 3), the module stops (not "converged").
    loop = make_loop(n=1, max_inner_steps=4, max_steps=10)
    s = Script(norms={0: [1, 2, 1, 2, 1]}, ratios={0: [0.9, 0.9]})
    d = run(loop, s, 10)
    assert [x.step for x in d if x.merged] == [4, 8]
    assert d[-1].kept_at_max_steps == [0] and d[-1].stopped_at_max_steps == [0] and d[-1].finished
    m = loop.modules[0]
    assert m.components == 3 and m.stopped and not m.converged and m.finished_at == 10


def test_max_steps_on_an_inner_loop_boundary_keeps_nothing_extra():
    # The inner loop ends at step 8 = T: merge, then stop with an untrained (b = 0) live component.
    loop = make_loop(n=1, max_inner_steps=4, max_steps=8)
    s = Script(norms={0: [1, 2, 1, 2]}, ratios={0: [0.9, 0.9]})
    d = run(loop, s, 8)
    assert d[-1].merged == [0] and d[-1].kept_at_max_steps == [] and d[-1].stopped_at_max_steps == [0]
    assert loop.modules[0].components == 2


def test_ranks_differ_by_freezing_time():
    # Three modules; module 2 converges after its first component (rank 0), module 1 after two
    # (rank 1 merged, second discarded), module 0 runs until T.
    loop = make_loop(n=3, max_inner_steps=2, check_interval=2, max_steps=7)
    s = Script(norms={i: [1.0] * 10 for i in range(3)},
               ratios={0: [0.9, 0.9, 0.9], 1: [0.9, 0.1], 2: [0.1]})
    run(loop, s, 7)
    assert [m.components for m in loop.modules] == [4, 1, 0]
    assert [m.converged for m in loop.modules] == [False, True, True]
    assert [m.finished_at for m in loop.modules] == [7, 4, 2]


def test_state_dict_round_trip_mid_inner_loop_gives_same_decisions():
    def script():
        return Script(norms={0: [1, 1.05, 2, 4, 8, 1, 1.01], 1: [1, 2, 2.05, 3, 4, 1, 1.01]},
                      ratios={0: [0.9, 0.9, 0.1], 1: [0.9, 0.9, 0.1]})
    ref, s_ref = make_loop(max_inner_steps=6), script()
    expected = [(d.step, d.converged, d.merged, d.finished) for d in run(ref, s_ref, 14)]

    first, s = make_loop(max_inner_steps=6), script()
    got = [(d.step, d.converged, d.merged, d.finished) for d in run(first, s, 5)]
    resumed = make_loop(max_inner_steps=6)
    resumed.load_state_dict(first.state_dict())
    got += [(d.step, d.converged, d.merged, d.finished) for d in run(resumed, s, 9)]
    assert got == expected


def test_criteria_switched_off_is_relora():
    # eps_in = eps_out = None: no inner check (norms never asked), every loop lasts T_in and merges.
    loop = make_loop(n=2, eps_in=None, eps_out=None, max_inner_steps=5, max_steps=17)
    s = Script(ratios={0: [1e-9] * 3, 1: [1e-9] * 3})
    d = run(loop, s, 17)
    assert s.norm_calls == []
    assert [x.step for x in d if x.merged] == [5, 10, 15]
    assert d[-1].kept_at_max_steps == [0, 1] and [m.components for m in loop.modules] == [4, 4]
