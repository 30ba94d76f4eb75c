"""Editing methods without a model: AlphaEdit's null-space solve, DeltaEdit's dynamic threshold and orthogonal
projector (DESIGN.md §2.4 and §4), the registry and the config dataclasses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaedit.methods import (
    METHODS,
    AlphaEdit,
    AlphaEditConfig,
    Decision,
    DeltaEdit,
    DeltaEditConfig,
    MethodConfig,
    method_class,
)
from deltaedit.methods.alphaedit import nullspace_projector
from deltaedit.methods.deltaedit import ThresholdTracker
from deltaedit.target import HalfSpaces
from deltaedit.updates import LowRankUpdate

CPU = torch.device("cpu")


def paper(**options) -> DeltaEditConfig:
    """Algorithm 1's options (the paper preset) with ``options`` on top: the tests of its mechanism."""
    return DeltaEditConfig(**{**DeltaEdit.presets["paper"], **options})


def low_rank_moment(d_ff: int, rank: int, seed: int, n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """C0 = E[k k^T] of keys that all lie in a ``rank``-dim subspace, and an orthonormal basis of it."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d_ff, rank, generator=g, dtype=torch.float64))
    keys = basis @ (torch.randn(rank, n, generator=g, dtype=torch.float64) * 2.0)
    return (keys @ keys.T / n).float(), basis.float()


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- AlphaEdit -------------------------------------------------------------------------------------


def test_nullspace_projector_is_the_orthogonal_complement_of_the_key_space():
    moment, basis = low_rank_moment(24, 6, seed=0)
    p0 = nullspace_projector(moment, 2e-2, "absolute")
    assert torch.allclose(p0, p0.T, atol=1e-6)
    assert torch.allclose(p0 @ p0, p0, atol=1e-5)
    assert round(torch.trace(p0).item()) == 24 - 6
    assert (p0 @ basis).norm() < 1e-5  # preserved directions are removed
    free = torch.eye(24) - basis @ basis.T
    assert torch.allclose(p0, free, atol=1e-5)


def test_nullspace_threshold_modes():
    # eigenvalues 10, 1, 0.1, 0.001 on the axes
    moment = torch.diag(torch.tensor([10.0, 1.0, 0.1, 0.001]))
    absolute = nullspace_projector(moment, 0.5, "absolute")
    assert torch.allclose(absolute, torch.diag(torch.tensor([0.0, 0.0, 1.0, 1.0])))
    relative = nullspace_projector(moment, 0.5, "relative")  # cut at 0.5 * 10 = 5
    assert torch.allclose(relative, torch.diag(torch.tensor([0.0, 1.0, 1.0, 1.0])))


def make_alphaedit(moment: torch.Tensor, layer: int = 3, **options) -> AlphaEdit:
    method = AlphaEdit(AlphaEditConfig(layers=(layer,), **options))
    method.build({layer: moment}, {layer: CPU}, d_model=8)
    return method


def test_alphaedit_update_leaves_preserved_keys_alone():
    """Delta = left @ right.T satisfies Delta k ~ 0 for every k in the span of the keys behind C0."""
    d_ff, d_model = 32, 8
    moment, basis = low_rank_moment(d_ff, 10, seed=1)
    method = make_alphaedit(moment)
    assert method.preserved_dims(3) == d_ff - 10
    keys = rand(d_ff, 3, seed=2)  # generic new keys: they overlap the preserved space
    residuals = rand(d_model, 3, seed=3)
    left, right = method.solve(3, keys, residuals)
    delta = left @ right.T
    assert delta.shape == (d_model, d_ff)
    preserved = basis @ rand(10, 50, seed=4)  # keys of the preserved space
    ratio = (delta @ preserved).norm(dim=0) / (delta.norm() * preserved.norm(dim=0))
    assert ratio.max() < 1e-5
    # ... while the same update does act on the new keys
    assert (delta @ keys).norm() > 0.1 * residuals.norm()


def test_alphaedit_solve_matches_the_design_formula_and_commit_accumulates_kp():
    """Delta = R K^T P0 (Kp Kp^T P0 + K K^T P0 + l2 I)^-1 (DESIGN §2.4), then Kp Kp^T += K K^T."""
    d_ff, d_model, l2 = 20, 6, 0.7
    moment, _ = low_rank_moment(d_ff, 5, seed=5)
    method = make_alphaedit(moment, l2=l2)
    p0 = method.projectors[3].double()

    def expected(keys, residuals, kp):
        k, r = keys.double(), residuals.double()
        system = kp @ p0 + k @ k.T @ p0 + l2 * torch.eye(d_ff, dtype=torch.float64)
        return r @ k.T @ p0 @ torch.linalg.inv(system)

    k1, r1 = rand(d_ff, 2, seed=6), rand(d_model, 2, seed=7)
    left, right = method.solve(3, k1, r1)
    assert torch.allclose((left @ right.T).double(), expected(k1, r1, torch.zeros(d_ff, d_ff).double()), atol=1e-5)

    method.commit({3: LowRankUpdate(left, right, k1)}, Decision())
    assert torch.allclose(method.key_moments[3], k1 @ k1.T, atol=1e-6)

    k2, r2 = rand(d_ff, 1, seed=8), rand(d_model, 1, seed=9)
    left2, right2 = method.solve(3, k2, r2)
    want = expected(k2, r2, (k1 @ k1.T).double())
    assert torch.allclose((left2 @ right2.T).double(), want, atol=1e-5)
    # A single request is a rank-one update alpha beta^T with alpha the residual
    assert left2.shape == (d_model, 1) and right2.shape == (d_ff, 1)
    assert torch.equal(left2, r2)

    method.revert({3: LowRankUpdate(left, right, k1)})
    assert method.key_moments[3].abs().max() < 1e-5


def test_alphaedit_reaches_a_key_inside_the_null_space():
    """For k in the null space and no earlier edits, Delta k = R |k|^2 / (|k|^2 + l2)."""
    d_ff, d_model, l2 = 16, 4, 0.5
    moment, basis = low_rank_moment(d_ff, 4, seed=10)
    method = make_alphaedit(moment, l2=l2)
    k = rand(d_ff, 1, seed=11)
    k = k - basis @ (basis.T @ k)
    r = rand(d_model, 1, seed=12)
    left, right = method.solve(3, k, r)
    got = left @ (right.T @ k)
    norm2 = float(k.pow(2).sum())
    assert torch.allclose(got, r * norm2 / (norm2 + l2), atol=1e-5)


def test_alphaedit_state_dict_round_trip():
    moment, _ = low_rank_moment(12, 3, seed=13)
    first = make_alphaedit(moment)
    keys = rand(12, 2, seed=14)
    first.commit({3: LowRankUpdate(rand(8, 2, seed=15), rand(12, 2, seed=16), keys)}, Decision())
    second = make_alphaedit(moment)
    second.load_state_dict(first.state_dict())
    assert torch.equal(second.key_moments[3], first.key_moments[3])
    assert torch.allclose(second.projected_moments[3], first.projected_moments[3], atol=1e-6)


# --- DeltaEdit: the dynamic threshold ---------------------------------------------------------------


def test_threshold_tracker_follows_algorithm_1_by_hand():
    """eta 2, delta 0.9, warm-up 3; m and v start at 0 and follow
    m <- d m + (1-d) s;  v <- d v + (1-d) (s - m_new)^2;  t = m + eta sqrt(v)  (DESIGN §4, paper eq. 22-24)."""
    tracker = ThresholdTracker(paper(layers=(0,), eta=2.0, ema_delta=0.9, warmup=3))
    assert (tracker.mean, tracker.var, tracker.threshold) == (0.0, 0.0, 0.0)

    # Warm-up: even huge scores never trigger, and they all move the statistics.
    assert tracker.decide(1000.0) == (False, 0.0)
    assert (tracker.mean, tracker.var, tracker.seen) == (0.0, 0.0, 0)  # decide() changes nothing

    tracker.record(1.0, False)  # m = 0.1, v = 0.1 * 0.9^2 = 0.081
    assert tracker.mean == pytest.approx(0.1) and tracker.var == pytest.approx(0.081)
    assert tracker.threshold == pytest.approx(0.1 + 2 * math.sqrt(0.081))

    tracker.record(2.0, False)  # m = 0.09 + 0.2 = 0.29, v = 0.0729 + 0.1 * 1.71^2 = 0.36531
    assert tracker.mean == pytest.approx(0.29) and tracker.var == pytest.approx(0.36531)

    assert tracker.decide(50.0)[0] is False  # second edit: still warming up
    tracker.record(3.0, False)  # m = 0.261 + 0.3 = 0.561, v = 0.328779 + 0.1 * 2.439^2 = 0.9236511
    assert tracker.mean == pytest.approx(0.561) and tracker.var == pytest.approx(0.9236511)
    threshold = 0.561 + 2 * math.sqrt(0.9236511)  # = 2.4831...

    # Warm-up over (3 edits seen): the 4th edit triggers exactly when its score exceeds the threshold.
    assert tracker.decide(2.48)[0] is False
    triggered, used = tracker.decide(2.49)
    assert triggered is True and used == pytest.approx(threshold)
    assert tracker.seen == 3 and tracker.mean == pytest.approx(0.561)  # decide() still changed nothing

    tracker.record(10.0, True)  # a triggering edit counts as seen but leaves m and v alone
    assert tracker.seen == 4 and tracker.updates == 3
    assert tracker.mean == pytest.approx(0.561) and tracker.var == pytest.approx(0.9236511)

    tracker.record(1.0, False)  # m = 0.5049 + 0.1 = 0.6049, v = 0.83128599 + 0.1 * 0.3951^2
    assert tracker.mean == pytest.approx(0.6049)
    assert tracker.var == pytest.approx(0.83128599 + 0.1 * 0.3951**2)


def test_threshold_is_strict_at_equality():
    tracker = ThresholdTracker(paper(layers=(0,), eta=2.0, warmup=0))
    tracker.mean, tracker.var = 1.0, 0.25  # t = 1 + 2 * 0.5 = 2 exactly
    assert tracker.decide(2.0) == (False, 2.0)
    assert tracker.decide(2.0000001)[0] is True


def test_threshold_tracker_research_code_ema_start():
    tracker = ThresholdTracker(paper(layers=(0,), ema_init="first", ema_delta=0.5))
    tracker.record(4.0, False)  # starts at the first value, variance 0
    assert (tracker.mean, tracker.var) == (4.0, 0.0)
    tracker.record(2.0, False)  # m = 2 + 1 = 3, v = 0 + 0.5 * (2 - 3)^2 = 0.5
    assert (tracker.mean, tracker.var) == (3.0, 0.5)


@settings(max_examples=40, deadline=None)
@given(
    scores=st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), min_size=1, max_size=30),
    eta=st.floats(min_value=0.0, max_value=5.0),
    delta=st.floats(min_value=0.0, max_value=1.0),
    warmup=st.integers(min_value=0, max_value=6),
)
def test_threshold_tracker_matches_a_reference_recursion(scores, eta, delta, warmup):
    tracker = ThresholdTracker(paper(layers=(0,), eta=eta, ema_delta=delta, warmup=warmup))
    m = v = 0.0
    for e, s in enumerate(scores):
        want = e >= warmup and s > m + eta * math.sqrt(v)
        triggered, threshold = tracker.decide(s)
        assert triggered == want
        assert threshold == pytest.approx(m + eta * math.sqrt(v), rel=1e-9, abs=1e-9)
        if not triggered:
            m = delta * m + (1 - delta) * s
            v = delta * v + (1 - delta) * (s - m) ** 2
        tracker.record(s, triggered)
    assert tracker.seen == len(scores)
    assert tracker.mean == pytest.approx(m, rel=1e-9, abs=1e-9)
    state = tracker.state()
    copy = ThresholdTracker(tracker.config)
    copy.load(state)
    assert (copy.mean, copy.var, copy.seen, copy.updates) == (tracker.mean, tracker.var, tracker.seen, tracker.updates)


# --- DeltaEdit: the orthogonal constraint -----------------------------------------------------------


def make_deltaedit(d_model: int = 12, d_ff: int = 20, **options) -> DeltaEdit:
    """A DeltaEdit on random statistics, with the paper's options unless asked."""
    config = paper(layers=(0, 1), **options)
    method = DeltaEdit(config)
    moments = {0: low_rank_moment(d_ff, 4, seed=20)[0], 1: low_rank_moment(d_ff, 4, seed=21)[0]}
    method.build(moments, {0: CPU, 1: CPU}, d_model)
    return method


def commit_rank_one(method: DeltaEdit, seed: int, decision: Decision) -> LowRankUpdate:
    d_model, d_ff = method.history.shape
    keys = rand(d_ff, 1, seed=seed + 1000)
    critical = LowRankUpdate(rand(d_model, 1, seed=seed), rand(d_ff, 1, seed=seed + 500), keys)
    lower = LowRankUpdate(rand(d_model, 1, seed=seed + 7), rand(d_ff, 1, seed=seed + 8), keys)
    method.commit({0: lower, 1: critical}, decision)
    return critical


def test_deltaedit_triggers_after_warmup_and_projects_out_the_history():
    method = make_deltaedit(eta=1.0, warmup=3)
    assert torch.equal(method.history, torch.zeros(12, 20))
    critical_updates = []
    for e in range(3):
        key = rand(20, 1, seed=300 + e)
        projector, decision = method.influence_projector(key)
        want_score = float((method.history @ key).pow(2).sum())
        assert decision.metrics["score"] == pytest.approx(want_score, rel=1e-5)
        assert projector is None and decision.triggered is False and decision.metrics.get("rank", 0) == 0  # warm-up
        critical_updates.append(commit_rank_one(method, seed=e, decision=decision))

    hist = sum(u.left @ u.right.T for u in critical_updates)
    assert torch.allclose(method.history, hist, atol=1e-5)  # Delta_hist = sum of critical-layer updates
    assert method.tracker.seen == 3

    # A key the history responds to strongly: s_e far above m + eta sqrt(v).
    key = critical_updates[0].right * 100
    projector, decision = method.influence_projector(key)
    assert decision.triggered is True and decision.metrics["score"] > decision.metrics["threshold"]
    assert decision.metrics.get("rank", 0) == 3  # three rank-one updates, all kept (3 <= 3/4 * 12)
    assert projector.shape == (12, 12)
    assert (projector @ hist).norm() < 1e-4 * hist.norm()
    assert torch.allclose(projector, projector.T, atol=1e-6)
    assert torch.allclose(projector @ projector, projector, atol=1e-5)
    assert round(torch.trace(projector).item()) == 12 - 3
    # What the projector keeps is untouched: a vector orthogonal to the history's columns passes through.
    u, _, _ = torch.linalg.svd(hist)
    free = u[:, 5]
    assert torch.allclose(projector @ free, free, atol=1e-5)
    # deciding did not move the statistics; committing a triggered edit moves only `seen`
    mean, var = method.tracker.mean, method.tracker.var
    commit_rank_one(method, seed=9, decision=decision)
    assert (method.tracker.mean, method.tracker.var, method.tracker.seen) == (mean, var, 4)


def test_deltaedit_caps_the_removed_directions_to_the_largest():
    method = make_deltaedit(d_model=8, eta=0.0, warmup=0, cap_fraction=0.25)  # cap = floor(8/4) = 2 directions
    rows, _ = torch.linalg.qr(rand(20, 5, seed=40))  # orthonormal right factors
    scales = torch.tensor([1.0, 5.0, 3.0, 0.5, 2.0])
    left = torch.zeros(8, 5)
    left[torch.arange(5), torch.arange(5)] = scales
    method.history = left @ rows.T  # column space: axes 0..4, singular values 1, 5, 3, 0.5, 2
    projector, decision = method.influence_projector(rand(20, 1, seed=77))
    assert decision.triggered and decision.metrics.get("rank", 0) == 2
    # only the two largest directions (axes 1 and 2) are removed
    assert torch.allclose(projector, torch.diag(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])), atol=1e-5)


def test_deltaedit_lowrank_projection_option():
    method = make_deltaedit(d_model=16, eta=0.0, warmup=0, projection="lowrank")
    big = rand(16, 1, seed=50)
    big = big / big.norm()
    method.history += 10 * big @ rand(1, 20, seed=51)
    projector, decision = method.influence_projector(rand(20, 1, seed=52))
    assert decision.triggered and 1 <= decision.metrics.get("rank", 0) <= 16 // 4
    assert (projector @ big).norm() < 1e-3


def test_deltaedit_norm_threshold_option_compares_the_plain_norm():
    method = make_deltaedit(threshold_on="norm", warmup=0)
    method.history += rand(12, 20, seed=60)
    key = rand(20, 1, seed=61)
    _, decision = method.influence_projector(key)
    assert decision.metrics["score"] == pytest.approx(float((method.history @ key).norm()), rel=1e-5)


def test_deltaedit_state_dict_and_revert():
    method = make_deltaedit(warmup=0)
    d = Decision(False, {"score": 2.0, "threshold": 0.0})
    first = commit_rank_one(method, seed=70, decision=d)
    second = commit_rank_one(method, seed=71, decision=Decision(False, {"score": 3.0, "threshold": 0.0}))
    copy = make_deltaedit(warmup=0)
    copy.load_state_dict(method.state_dict())
    assert torch.equal(copy.history, method.history)
    assert (copy.tracker.mean, copy.tracker.var, copy.tracker.seen) == (
        method.tracker.mean,
        method.tracker.var,
        method.tracker.seen,
    )
    method.revert({0: second, 1: second})
    assert torch.allclose(method.history, first.left @ first.right.T, atol=1e-5)


def test_ema_init_first_starts_from_the_first_non_empty_history():
    """Edit 0's score is 0 (Delta_hist is still empty); "first" must start the EMA at the next score, not at 0."""
    tracker = ThresholdTracker(paper(layers=(0,), ema_init="first", ema_delta=0.5))
    tracker.record(0.0, False, history_empty=True)
    assert (tracker.mean, tracker.var, tracker.updates, tracker.seen) == (0.0, 0.0, 0, 1)
    tracker.record(4.0, False, history_empty=False)
    assert (tracker.mean, tracker.var) == (4.0, 0.0)
    zero = ThresholdTracker(paper(layers=(0,), ema_init="zero", ema_delta=0.5))
    zero.record(0.0, False, history_empty=True)
    zero.record(4.0, False, history_empty=False)
    assert zero.mean == 2.0  # the paper's EMA from 0 folds both


def test_deltaedit_first_edit_decision_says_the_history_was_empty():
    method = make_deltaedit(ema_init="first", warmup=0, two_sided=True)  # v == 0: nothing triggers yet
    _, decision = method.influence_projector(rand(20, 1, seed=1))
    assert decision.metrics["history_empty"] is True and decision.metrics["score"] == 0.0
    commit_rank_one(method, seed=2, decision=decision)
    assert method.tracker.updates == 0  # the empty history's score was not folded in
    _, decision = method.influence_projector(rand(20, 1, seed=3))
    assert decision.metrics["history_empty"] is False
    commit_rank_one(method, seed=4, decision=decision)
    assert method.tracker.mean == pytest.approx(decision.metrics["score"])


def test_two_sided_test_triggers_below_the_mean_and_only_once_the_variance_is_positive():
    config = paper(layers=(0,), eta=1.0, warmup=0, two_sided=True)
    tracker = ThresholdTracker(config)
    tracker.mean, tracker.var = 10.0, 0.0
    assert tracker.decide(1000.0)[0] is False  # v == 0: never
    tracker.var = 4.0  # |s - 10| > 2 triggers on both sides
    assert tracker.decide(7.0)[0] is True and tracker.decide(13.0)[0] is True
    assert tracker.decide(9.0)[0] is False
    one_sided = ThresholdTracker(config.replace(two_sided=False))
    one_sided.mean, one_sided.var = 10.0, 4.0
    assert one_sided.decide(7.0)[0] is False


def test_clipped_ema_update_cannot_lock_in():
    """A score that grows without bound: with the paper's update only untriggered edits move the EMA, so once
    the scores outgrow the threshold every edit triggers; the clipped update drags the threshold along."""
    scores = [float(e) ** 2 for e in range(1, 200)]
    shares = {}
    for update in ("untriggered", "clipped"):
        tracker = ThresholdTracker(paper(layers=(0,), eta=3.0, warmup=5, ema_update=update))
        fired = []
        for s in scores:
            triggered, _ = tracker.decide(s)
            tracker.record(s, triggered)
            fired.append(triggered)
        shares[update] = sum(fired[100:]) / len(fired[100:])
    assert shares["untriggered"] == 1.0
    assert shares["clipped"] < 1.0
    tracker = ThresholdTracker(paper(layers=(0,), ema_update="clipped", ema_delta=0.5, warmup=0))
    tracker.mean, tracker.var = 1.0, 0.0  # threshold 1
    tracker.record(100.0, True)
    assert tracker.mean == pytest.approx(1.0)  # folded min(100, 1)


def test_trigger_always_and_never():
    always = ThresholdTracker(paper(layers=(0,), trigger="always", warmup=1))
    assert always.decide(5.0) == (False, 0.0)  # warm-up
    always.record(5.0, False)
    assert always.decide(0.0, history_empty=False)[0] is True
    assert always.decide(3.0, history_empty=True)[0] is False
    never = ThresholdTracker(paper(layers=(0,), trigger="never", warmup=0))
    assert never.decide(1e9)[0] is False


def test_score_key_prompt_reads_the_bare_prompts_key():
    method = make_deltaedit(score_key="prompt", warmup=0)
    method.history += rand(12, 20, seed=80)
    per_context = rand(20, 6, seed=81)  # two requests x three prompts, bare prompt first
    mean = per_context.reshape(20, 2, 3).mean(2)
    _, decision = method.influence_projector(mean, per_context)
    bare = per_context[:, [0, 3]]
    assert decision.metrics["score"] == pytest.approx(float((method.history @ bare).pow(2).sum(0).mean()), rel=1e-5)
    _, averaged = make_deltaedit(warmup=0).influence_projector(mean, per_context)
    assert averaged.metrics["score"] == 0.0  # that one's history is still empty


def test_lowrank_takes_its_rank_from_cap_fraction():
    """The randomized decomposition keeps up to cap_fraction x d_model directions, not a fixed d/4."""
    d_model = 16
    basis, _ = torch.linalg.qr(rand(d_model, 8, seed=90))
    for cap, want in ((0.5, 8), (0.25, 4)):
        method = make_deltaedit(d_model=d_model, eta=0.0, warmup=0, projection="lowrank", cap_fraction=cap)
        method.history = basis @ (torch.diag(torch.arange(8.0, 0.0, -1.0) + 2) @ rand(8, 20, seed=91))
        state = torch.random.get_rng_state()
        projector, decision = method.influence_projector(rand(20, 1, seed=92))
        assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG touched
        assert decision.triggered and decision.metrics.get("rank", 0) == want
        again, _ = method.influence_projector(rand(20, 1, seed=92))
        assert torch.equal(projector, again)  # seeded: the same directions every time


def test_absolute_eigenvalue_cut():
    method = make_deltaedit(d_model=8, eta=0.0, warmup=0, eig_cut=1.0)
    rows, _ = torch.linalg.qr(rand(20, 3, seed=41))
    left = torch.zeros(8, 3)
    left[torch.arange(3), torch.arange(3)] = torch.tensor([2.0, 0.5, 3.0])  # eigenvalues of D: 4, 0.25, 9
    method.history = left @ rows.T
    _, decision = method.influence_projector(rand(20, 1, seed=42))
    assert decision.metrics.get("rank", 0) == 2  # 0.25 <= 1 is not removed


def test_include_response_weights_the_directions_this_edit_fires():
    """D = Delta_hist Delta_hist^T (+ r r^T with r = Delta_hist k_e): with room for one direction, the response
    of a key that fires the weaker history direction makes that direction the one removed."""
    rows, _ = torch.linalg.qr(rand(20, 2, seed=43))
    history = torch.zeros(8, 20)
    history[0] = 3.0 * rows[:, 0]
    history[1] = 2.0 * rows[:, 1]
    key = 10.0 * rows[:, 1:2]  # Delta_hist k = 20 e_1
    kept = {}
    for include in (False, True):
        method = make_deltaedit(d_model=8, eta=0.0, warmup=0, cap_fraction=1 / 8, include_response=include)
        method.history = history.clone()
        projector, decision = method.influence_projector(key)
        assert decision.metrics.get("rank", 0) == 1
        kept[include] = projector.diagonal()[:2].tolist()
    assert kept[False] == pytest.approx([0.0, 1.0], abs=1e-5)  # the stronger history direction
    assert kept[True] == pytest.approx([1.0, 0.0], abs=1e-5)  # the one this key fires


def test_targeted_constraint_removes_only_the_responses_of_this_edits_keys():
    method = make_deltaedit(d_model=12, eta=0.0, warmup=0, constraint="targeted")
    method.history += rand(12, 20, seed=100)
    per_context = rand(20, 3, seed=101)
    keys = per_context.mean(1, keepdim=True)
    projector, decision = method.influence_projector(keys, per_context)
    responses = method.history @ per_context
    assert decision.metrics.get("rank", 0) == 3  # three prompts; their mean's response is in their span
    assert (projector @ responses).norm() < 1e-4 * responses.norm()
    assert round(torch.trace(projector).item()) == 12 - 3
    full, paper = make_deltaedit(d_model=12, eta=0.0, warmup=0), None
    full.history = method.history.clone()
    _, paper = full.influence_projector(keys, per_context)
    assert paper.metrics.get("rank", 0) == 9  # the paper's constraint: 3/4 of d_model here
    mean_only = make_deltaedit(d_model=12, eta=0.0, warmup=0, constraint="targeted", targeted_keys="mean")
    mean_only.history = method.history.clone()
    projector, decision = mean_only.influence_projector(keys, per_context)
    response = method.history @ keys
    assert decision.metrics.get("rank", 0) == 1 and round(torch.trace(projector).item()) == 12 - 1
    assert (projector @ response).norm() < 1e-4 * response.norm()
    assert (projector @ responses).norm() > 0.1 * responses.norm()  # the single prompts' responses stay free


def test_one_sided_constraint_is_the_cone_of_the_edits_responses():
    """orthogonality="one_sided": the target vector may point against Delta_hist k, never along it."""
    method = make_deltaedit(d_model=12, eta=0.0, warmup=0, constraint="targeted", orthogonality="one_sided")
    method.history += rand(12, 20, seed=100)
    per_context = rand(20, 3, seed=101)
    cone, decision = method.influence_projector(per_context.mean(1, keepdim=True), per_context)
    assert isinstance(cone, HalfSpaces) and decision.metrics.get("rank", 0) == 4  # three prompts and their mean
    responses = method.history @ per_context
    # the normals are Delta_hist k itself: their sign is the noise's
    own = torch.cat([responses, method.history @ per_context.mean(1, keepdim=True)], dim=1)
    assert torch.allclose(cone.normals, own.double(), rtol=1e-5, atol=1e-4)
    against = -responses.sum(1)  # cancels noise: inside the cone, passes unchanged
    assert torch.allclose(cone(against), against)
    for seed in range(5):
        x = 10 * rand(12, seed=200 + seed).squeeze()
        p = cone(x).double()
        assert (cone.normals.T @ p <= 1e-6 * x.norm()).all()  # inside
        assert torch.allclose(cone(p.float()), p.float(), atol=1e-5)  # idempotent
        # the nearest point of a convex cone: (x - p) is orthogonal to p and makes an obtuse angle with any y in it
        residual = x.double() - p
        assert abs(float(residual @ p)) < 1e-5 * x.norm() ** 2
        others = torch.stack([cone(100 * rand(12, seed=300 + i).squeeze()).double() for i in range(20)])
        assert (others @ residual <= 1e-5 * x.norm() ** 2).all()


def test_one_sided_constraint_gives_each_request_of_a_batch_its_own_cone():
    method = make_deltaedit(d_model=12, eta=0.0, warmup=0, constraint="targeted", orthogonality="one_sided")
    method.history += rand(12, 20, seed=120)
    per_context = rand(20, 6, seed=121)  # two requests x three prompts
    mean = per_context.reshape(20, 2, 3).mean(2)
    cones, decision = method.influence_projector(mean, per_context)
    assert [cone.count for cone in cones] == [4, 4] and decision.metrics.get("rank", 0) == 8
    for cone, contexts, key in zip(cones, per_context.split(3, dim=1), mean.split(1, dim=1), strict=True):
        own = method.history @ torch.cat([contexts, key], dim=1)
        assert torch.allclose(cone.normals, own.double(), rtol=1e-5, atol=1e-4)


def test_one_sided_projection_ignores_zero_normals_and_reports_a_failed_solve(monkeypatch):
    cone = HalfSpaces(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # x_0 <= 0, and a zero normal (no history yet)
    assert torch.allclose(cone(torch.tensor([2.0, 3.0])), torch.tensor([0.0, 3.0]))
    assert torch.equal(HalfSpaces(torch.zeros(2, 1))(torch.tensor([2.0, 3.0])), torch.tensor([2.0, 3.0]))

    def stuck(*args, **kwargs):
        raise RuntimeError("Maximum number of iterations reached.")

    monkeypatch.setattr("scipy.optimize.nnls", stuck)
    with pytest.raises(FloatingPointError, match="did not converge"):  # the editor turns it into an EditFailure
        cone(torch.tensor([2.0, 3.0]))


def test_one_sided_constraint_refuses_what_it_cannot_sign():
    with pytest.raises(ValueError, match="orthogonality"):
        paper(layers=(0,), orthogonality="one_sided")  # the paper's history constraint has no signed directions
    with pytest.raises(ValueError, match="orthogonality"):
        paper(layers=(0,), constraint="targeted", neighbors=2, orthogonality="one_sided")
    with pytest.raises(ValueError, match="project_moments"):
        paper(layers=(0,), constraint="targeted", orthogonality="one_sided", project_moments=True)


def test_project_moments_reaches_the_target_search():
    assert paper(layers=(0,), project_moments=True).target_settings().project_moments is True
    assert paper(layers=(0,)).target_settings().project_moments is False


def test_targeted_constraint_with_neighbors_adds_the_most_similar_past_keys():
    method = make_deltaedit(d_model=12, eta=0.0, warmup=0, constraint="targeted", neighbors=1)
    method.history += rand(12, 20, seed=110)
    near, far = rand(20, 1, seed=111), rand(20, 1, seed=112)
    method.past_keys = [far, near]
    key = near + 0.01 * rand(20, 1, seed=113)
    projector, decision = method.influence_projector(key, key)
    assert decision.metrics.get("rank", 0) == 2  # the edit's own key and its nearest past key
    assert (projector @ (method.history @ near)).norm() < 1e-4 * (method.history @ near).norm()
    assert (projector @ (method.history @ far)).norm() > 0.1 * (method.history @ far).norm()


def test_past_keys_follow_commit_revert_and_state_dict():
    method = make_deltaedit(warmup=0, neighbors=2, constraint="targeted")
    decision = Decision(False, {"score": 0.0, "threshold": 0.0})
    first = commit_rank_one(method, seed=120, decision=decision)
    second = commit_rank_one(method, seed=121, decision=decision)
    assert [torch.equal(k, u.keys) for k, u in zip(method.past_keys, (first, second), strict=True)] == [True, True]
    copy = make_deltaedit(warmup=0, neighbors=2, constraint="targeted")
    copy.load_state_dict(method.state_dict())
    assert len(copy.past_keys) == 2 and torch.equal(copy.past_keys[1], second.keys)
    method.revert({0: first, 1: first})
    assert len(method.past_keys) == 1 and torch.equal(method.past_keys[0], second.keys)
    method.reset()
    assert method.past_keys == []


# --- registry and configs ---------------------------------------------------------------------------


def test_registry():
    assert {"alphaedit", "deltaedit"} <= set(METHODS)
    assert method_class("alphaedit") is AlphaEdit
    assert method_class("DeltaEdit") is DeltaEdit
    assert DeltaEdit.config_class is DeltaEditConfig and AlphaEdit.needs_statistics
    with pytest.raises(ValueError, match="nope") as info:
        method_class("nope")
    assert "alphaedit" in str(info.value) and "deltaedit" in str(info.value)


def test_config_unknown_option_names_the_field():
    with pytest.raises(ValueError, match="^etta: not an option of DeltaEditConfig"):
        DeltaEditConfig.from_dict({"layers": [1, 2], "etta": 1.0})
    with pytest.raises(ValueError, match="eta"):  # the message lists the real options
        AlphaEditConfig.from_dict({"eta": 1.0})


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"layers": []}, "layers"),
        ({"layers": [3, 2]}, "layers"),
        ({"layers": [2, 2]}, "layers"),
        ({"steps": -1}, "steps"),
        ({"stop_prob": 0.0}, "stop_prob"),
        ({"threshold_on": "cube"}, "threshold_on"),
        ({"ema_init": "one"}, "ema_init"),
        ({"ema_update": "some"}, "ema_update"),
        ({"constraint": "all"}, "constraint"),
        ({"trigger": "sometimes"}, "trigger"),
        ({"score_key": "last"}, "score_key"),
        ({"neighbors": -1}, "neighbors"),
        ({"kl_position": "end"}, "kl_position"),
        ({"search_dtype": "int8"}, "search_dtype"),
        ({"projection": "qr"}, "projection"),
        ({"ema_delta": 1.5}, "ema_delta"),
        ({"cap_fraction": 0.0}, "cap_fraction"),
        ({"nullspace_mode": "both"}, "nullspace_mode"),
    ],
)
def test_config_validation_names_the_field(options, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        DeltaEditConfig.from_dict(options)


def test_key_average_and_restrain_base_are_options_with_their_own_checks():
    assert DeltaEditConfig(key_average="flat").key_average == "flat" and DeltaEditConfig().key_average == "grouped"
    with pytest.raises(ValueError, match="^key_average: use one of"):
        DeltaEditConfig(key_average="median")
    assert DeltaEditConfig(restrain_base=1.2).restrain_base == 1.2
    with pytest.raises(ValueError, match="^restrain_base: the log's base must be > 1"):
        DeltaEditConfig(restrain_base=1.0)


def test_config_round_trip_and_fingerprint():
    config = DeltaEditConfig(layers=[1, 2, 4], eta=1.5, projection="lowrank", stats_corpus="x.txt")
    assert config.layers == (1, 2, 4) and config.critical_layer == 4
    data = config.to_dict()
    assert data["layers"] == [1, 2, 4] and data["eta"] == 1.5
    again = DeltaEditConfig.from_dict(data)
    assert again == config
    assert again.fingerprint() == config.fingerprint()
    assert config.replace(eta=2.0).fingerprint() != config.fingerprint()
    settings_ = config.target_settings()
    assert (settings_.steps, settings_.lr, settings_.clamp_norm_factor) == (config.steps, config.lr, 0.75)
    assert isinstance(config, MethodConfig)


# --- the baselines' defining invariants ---------------------------------------------------------------


def test_rome_update_is_rank_one_and_maps_the_key_to_its_residual():
    from deltaedit.methods import ROME, ROMEConfig

    moment, _ = low_rank_moment(20, 20, seed=130)
    method = ROME(ROMEConfig(layers=(3,)))
    method.build({3: moment}, {3: CPU}, 8)
    key, residual = rand(20, 1, seed=131), rand(8, 1, seed=132)
    left, right = method.solve(3, key, residual)
    update = LowRankUpdate(left, right, key)
    assert update.rank == 1 and torch.linalg.matrix_rank(update.dense()).item() == 1
    assert torch.allclose(update.dense() @ key, residual, atol=1e-4)  # Delta k = r exactly
    u = torch.linalg.solve(moment.double(), key.double())
    assert torch.allclose(right.double(), u / (u.T @ key.double()), rtol=1e-3)  # C^-1 k / (k^T C^-1 k)
    with pytest.raises(ValueError, match="^layers: ROME edits exactly one layer"):
        ROMEConfig(layers=(2, 3))


def test_memit_solve_is_the_closed_form():
    from deltaedit.methods import MEMIT, MEMITConfig

    moment, _ = low_rank_moment(16, 16, seed=140)  # full rank: the system is invertible
    method = MEMIT(MEMITConfig(layers=(2,), mom2_weight=3.0))
    method.build({2: moment}, {2: CPU}, 6)
    keys, residuals = rand(16, 3, seed=141), rand(6, 3, seed=142)
    left, right = method.solve(2, keys, residuals)
    k, r = keys.double(), residuals.double()
    closed = r @ k.T @ torch.linalg.inv(3.0 * moment.double() + k @ k.T)  # R K^T (lambda C0 + K K^T)^-1
    assert torch.allclose((left @ right.T).double(), closed, atol=1e-4)


def test_prune_bounds_the_singular_values_of_the_accumulated_change():
    from deltaedit.methods import PRUNE, PRUNEConfig

    method = PRUNE(PRUNEConfig(layers=(0,)))
    base = torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.25])) @ torch.eye(4, 9)
    updates = [LowRankUpdate(rand(4, 1, seed=150 + i) * 3, rand(9, 1, seed=160 + i), None) for i in range(4)]
    plain = sum(u.dense() for u in updates)
    composed = method.compose(0, base, updates)
    before = torch.linalg.svdvals(plain.double())
    after = torch.linalg.svdvals((composed - base).double())
    s_max = 2.0
    assert before.max() > s_max  # the plain sum exceeds the original's largest singular value
    expected = torch.where(before > s_max, s_max + torch.log(before / s_max), before)
    assert torch.allclose(after, expected, atol=1e-4)
    assert after.max() <= s_max + math.log(before.max().item() / s_max) + 1e-4
    assert not method.composes_by_sum  # every write recomputes the layer from W0 (plain MEMIT adds in place)
    # W0's norm is kept per layer, and taken again for another W0 of that layer (an edits file on another model)
    doubled = method.compose(0, 2 * base, updates) - 2 * base
    expected = torch.where(before > 2 * s_max, 2 * s_max + torch.log(before / (2 * s_max)), before)
    assert torch.allclose(torch.linalg.svdvals(doubled.double()), expected, atol=1e-4)
    assert torch.equal(method.compose(0, base, updates), composed)  # and back: bit for bit the first write


def test_prune_continues_its_sum_write_after_write_with_the_bits_of_a_sum_from_scratch():
    from deltaedit.methods import PRUNE, PRUNEConfig

    base = torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.25])) @ torch.eye(4, 9)
    updates = [LowRankUpdate(rand(4, 1, seed=180 + i) * 3, rand(9, 1, seed=190 + i), None) for i in range(6)]
    live = PRUNE(PRUNEConfig(layers=(0,)))
    # edit after edit, an undo (a shorter list), a failed write (a candidate that is then replaced), the rest
    for count in (1, 2, 3, 4, 2, 3, 5, 6):
        fresh = PRUNE(PRUNEConfig(layers=(0,)))
        assert torch.equal(live.compose(0, base, updates[:count]), fresh.compose(0, base, updates[:count])), count
    other = LowRankUpdate(rand(4, 1, seed=199), rand(9, 1, seed=198), None)
    live.compose(0, base, [*updates[:3], other])
    assert torch.equal(
        live.compose(0, base, updates[:4]), PRUNE(PRUNEConfig(layers=(0,))).compose(0, base, updates[:4])
    )


def test_prune_restraint_equals_the_full_svd_form():
    from deltaedit.methods.base import restrain_change

    for shape in ((12, 7), (7, 12)):
        change = rand(*shape, seed=200) * 4
        u, s, vh = torch.linalg.svd(change.double(), full_matrices=False)
        s_max = torch.tensor(2.5, dtype=torch.float64)
        for function, mapped in (("log", s_max + torch.log(s / s_max)), ("linear", (s + s_max) / 2)):
            expected = (u * torch.where(s > s_max, mapped, s)) @ vh
            assert torch.allclose(restrain_change(change, s_max, function).double(), expected, atol=1e-5), shape
        # PRUNE's alpha: F(s) = s_max + log_1.2(s / s_max), a looser restraint than the natural log's
        expected = (u * torch.where(s > s_max, s_max + torch.log(s / s_max) / math.log(1.2), s)) @ vh
        assert torch.allclose(restrain_change(change, s_max, "log", 1.2).double(), expected, atol=1e-5), shape
    small = rand(5, 4, seed=201) * 1e-3
    assert restrain_change(small, torch.tensor(1.0, dtype=torch.float64)) is small  # nothing above s_max


def test_rect_keeps_the_stated_fraction_of_entries_by_relative_change():
    from deltaedit.methods import RECT, RECTConfig
    from deltaedit.updates import SparseUpdate

    method = RECT(RECTConfig(layers=(0,)))
    weight = rand(10, 20, seed=170) + 0.1
    update = LowRankUpdate(rand(10, 1, seed=171), rand(20, 1, seed=172), rand(20, 1, seed=173))
    kept = method.finalize_update(0, update, weight)
    assert isinstance(kept, SparseUpdate) and kept.values.numel() == 40  # 20% of 200 entries
    dense, full = kept.dense(), update.dense()
    relative = (full.abs() / weight.abs()).reshape(-1)
    chosen = kept.indices
    assert relative[chosen].min() >= relative[torch.ones(200, dtype=torch.bool).index_fill_(0, chosen, False)].max()
    assert torch.equal(dense.reshape(-1)[chosen], full.reshape(-1)[chosen])
    assert int((dense != 0).sum()) == 40 and torch.equal(kept.keys, update.keys)


def test_a_sparse_update_keeps_its_mask_as_packed_bits_and_reads_the_older_flat_positions():
    import numpy as np

    from deltaedit.updates import SparseUpdate, pack_bits, unpack_bits, update_from_tensors

    generator = torch.Generator().manual_seed(174)
    for count in (1, 7, 8, 9, 203):
        flat = torch.rand(count, generator=generator) < 0.3
        assert np.array_equal(pack_bits(flat).numpy(), np.packbits(flat.numpy()))
        assert torch.equal(unpack_bits(pack_bits(flat), count), flat)
    delta, mask = rand(10, 21, seed=175), torch.rand(10, 21, generator=generator) < 0.2
    kept = SparseUpdate.keep(delta, mask)
    assert torch.equal(kept.dense(), torch.where(mask, delta, torch.zeros(())))
    assert kept.tensors()["mask"].numel() == 27  # 210 bits
    older = {"indices": mask.reshape(-1).nonzero().squeeze(1), "values": kept.values, "shape": torch.tensor([10, 21])}
    assert torch.equal(update_from_tensors("sparse", older).dense(), kept.dense())
    order = torch.randperm(len(kept.values), generator=generator)
    shuffled = {**older, "indices": older["indices"][order], "values": kept.values[order]}
    assert torch.equal(update_from_tensors("sparse", shuffled).dense(), kept.dense())  # any order of positions
    for broken in ({"mask": kept.mask[:-1]}, {"values": kept.values[:-1]}, {"mask": kept.mask.long()}):
        with pytest.raises(ValueError, match="sparse"):
            update_from_tensors("sparse", {**kept.tensors(), **broken})


def test_neighbors_by_activation_pick_the_past_key_the_update_fires_on_most():
    options = {"constraint": "targeted", "neighbors": 1, "neighbors_by": "activation"}
    method = make_deltaedit(d_model=12, eta=0.0, warmup=0, **options)
    method.history += rand(12, 20, seed=180)
    key = rand(20, 1, seed=181)
    _, beta = method.solve(1, key, torch.zeros(1, 1))
    candidates = [rand(20, 1, seed=182 + i) for i in range(4)]
    fired = [float((c.T @ beta).abs()) for c in candidates]
    method.past_keys = candidates
    projector, decision = method.influence_projector(key, key)
    strongest = candidates[max(range(4), key=fired.__getitem__)]
    weakest = candidates[min(range(4), key=fired.__getitem__)]
    assert decision.metrics["rank"] == 2
    assert (projector @ (method.history @ strongest)).norm() < 1e-4 * (method.history @ strongest).norm()
    assert (projector @ (method.history @ weakest)).norm() > 0.05 * (method.history @ weakest).norm()
