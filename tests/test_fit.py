"""fit.py: the planner's decisions on recorded measurements, the budget on a fake clock, the refusals
before any work, and one real run under a 90-second budget."""
import json
import time

import numpy as np
import pandas as pd
import pytest

from tests.conftest import run_script
from utils.fit.plan import (EPOCHS_MAX, LADDER, SETUP_S, SLACK, TIMED_MARGIN, BudgetTooSmall, Costs, Facts, Speed,
                            State, epoch_key, finetune_limit, fold_epochs, ladder, parse_budget, plan)
from utils.fit.run import execute

# Recorded on a 2-core AMD EPYC with AVX2 only (python -m utils.fit.measure's figures for
# tf_efficientnet_lite0; 28-px photos upscaled): training, forward and decoding images/s
RECORDED = {64: Speed(100.0, 472.7, 4286), 96: Speed(82.7, 452.3, 5474), 128: Speed(43.9, 189.3, 3921),
            224: Speed(12.7, 51.9, 3404)}
B = "lite0"


def facts(budget_s: float, native: int = 28, n_train: int = 4000, n_test: int = 2000) -> Facts:
    return Facts(n_train=n_train, n_test=n_test, native=native, budget_s=budget_s, backbones=(B,),
                 sizes={B: ladder(224)}, head_rows_per_s={B: 14000.0})


def speeds(slower: float = 1.0):
    """The recorded speeds (``slower`` times slower), extrapolated between sizes as the measurer does."""
    def speed(b, s):
        if s in RECORDED:
            sp = RECORDED[s]
        else:
            near = min(RECORDED, key=lambda m: abs(m - s))
            sp = RECORDED[near].at(s, near)
        return Speed(sp.train / slower, sp.infer / slower, sp.decode / slower)
    return speed


def total(steps) -> float:
    return sum(s.seconds for s in steps)


def finetune_work(steps) -> float:
    """Fine-tuning's work in pixel-epochs: a plan that trains less trains fewer epochs or smaller."""
    return sum(s.epochs * s.size ** 2 for s in steps if s.kind == "finetune")


def test_parse_budget():
    assert [parse_budget(x) for x in ("90", "90s", "10m", "1.5h", 30)] == [90, 90, 600, 5400, 30]
    for bad in ("ten minutes", "-5m", "0", ""):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)


def test_a_slower_machine_gets_less_training_not_a_blown_budget():
    for budget in (600, 1800):
        fast = plan(facts(budget), State(), Costs(facts(budget), speeds()), 0)
        slow = plan(facts(budget), State(), Costs(facts(budget), speeds(3.0)), 0)
        assert total(fast) <= budget and total(slow) <= budget
        assert [s.kind for s in fast][:2] == ["frozen", "floor"] and fast[-2:][-1].kind == "infer"
        assert finetune_work(fast) > 0  # the recorded machine fine-tunes at these budgets
        assert finetune_work(slow) < finetune_work(fast)
    # half an hour buys more than ten minutes, on the same machine
    ten, thirty = (plan(facts(b), State(), Costs(facts(b), speeds()), 0) for b in (600, 1800))
    assert finetune_work(thirty) > finetune_work(ten)
    assert all(s.epochs <= EPOCHS_MAX for s in thirty)
    # the learning-rate search: every rate the time allows, fold 0's first epoch each
    search = [s for s in thirty if s.kind == "search"]
    assert len(search) == 1 and len(search[0].rates) == 3 and search[0].fold == 0


def test_image_size_follows_the_data_and_what_the_frozen_sweep_measured():
    f = facts(1800)
    costs = Costs(f, speeds())
    assert plan(f, State(), costs, 0)[0].size == 64  # 28-px photos: the smallest size
    big = facts(1800, native=500)
    assert plan(big, State(), Costs(big, speeds()), 0)[0].size == 224  # never above the weights' own size
    # on 200-px images, a step up that gained goes one step further (to a size fine-tuning could then
    # run at: two hours buy 6 epochs of every fold at 128 px); one that lost, stops; fine-tuning stays
    # at or below the best frozen size
    f = facts(7200, native=200)
    costs = Costs(f, speeds())
    gained = State(frozen={(B, 64): 0.80, (B, 96): 0.85}, done={"floor"}, spent={"frozen": 60.0})
    steps = plan(f, gained, costs, 100)
    assert [s.size for s in steps if s.kind == "frozen"] == [128]
    lost = State(frozen={(B, 64): 0.85, (B, 96): 0.8499}, done={"floor"}, spent={"frozen": 60.0})
    steps = plan(f, lost, costs, 100)
    assert not [s for s in steps if s.kind == "frozen"]
    assert {s.size for s in steps if s.kind in ("search", "finetune")} <= {64, 96}
    worse = State(frozen={(B, 64): 0.85, (B, 96): 0.80}, done={"floor"}, spent={"frozen": 60.0})
    assert {s.size for s in plan(f, worse, costs, 100) if s.kind in ("search", "finetune")} == {64}
    # 28-px photos: the frozen route's upscaling gained, but fine-tuning does not upscale past the first
    # size, its epochs go up instead, and no step up runs before it (none is a size it would use)
    small = facts(7200)
    steps = plan(small, gained, Costs(small, speeds()), 100)
    assert {s.size for s in steps if s.kind in ("search", "finetune")} == {64}
    assert not [s for s in steps if s.kind == "frozen"]
    assert [s.epochs for s in steps if s.kind == "finetune"] == [EPOCHS_MAX] * 3
    assert finetune_limit(small, B) == 64 and finetune_limit(facts(60, native=150), B) == 150


def test_the_sweep_steps_up_only_to_a_size_fine_tuning_can_use_until_fine_tuning_is_done():
    """Half an hour on 4,000 photos fine-tunes 6 epochs at 96 px but not at 128: the sweep stops at 96
    and fine-tuning gets its seconds; once every fold is done, the time left goes on up the ladder.
    With no fine-tuning in the budget at all, the frozen route takes every step its share allows.
    (Images of 200 px: fine-tuning may run at any size of the sweep.)"""
    f = facts(1800, native=200)
    costs = Costs(f, speeds())
    gained = State(frozen={(B, 64): 0.80, (B, 96): 0.85}, done={"floor"}, spent={"frozen": 60.0})
    steps = plan(f, gained, costs, 100)
    assert not [s for s in steps if s.kind == "frozen"]
    assert {s.size for s in steps if s.kind in ("search", "finetune")} == {96}
    first = State(frozen={(B, 64): 0.80}, done={"floor"}, spent={"frozen": 20.0})
    up = [s for s in plan(f, first, costs, 30) if s.kind == "frozen"]
    assert [s.size for s in up] == [96] and "fine-tuning could run at 96 px" in up[0].why
    # fine-tuning under way: no step up between its folds, however much time is left
    under_way = State(frozen=dict(gained.frozen), done={"floor"}, spent={"frozen": 60.0, "finetune": 100.0},
                      finetune={"backbone": B, "size": 96, "rate": 3.0, "epochs": 2, "done": [0]})
    assert not [s for s in plan(f, under_way, costs, 300) if s.kind == "frozen"]
    # every fold done with time to spare: the sweep goes on, then the last stages, within the budget
    under_way.finetune["done"] = [0, 1, 2]
    steps = plan(f, under_way, costs, 600)
    assert [s.kind for s in steps][:2] == ["frozen", "ensemble"] and steps[0].size == 128
    assert 600 + total(steps) <= f.budget_s
    # with the margin of a size not yet run: one that would fit to the second, not with the margin, waits
    late = plan(f, under_way, costs, 1670)
    assert not [s for s in late if s.kind == "frozen"]
    assert 1670 + costs.frozen(B, 128) * 1.1 + total(late) + costs.export(1) - costs.export(0) <= f.budget_s
    # a budget no fine-tuning fits: the frozen route sweeps up
    small = facts(240)
    alone = State(frozen={(B, 64): 0.80}, done={"floor"}, spent={"frozen": 20.0})
    steps = plan(small, alone, Costs(small, speeds()), 25)
    assert [s.size for s in steps if s.kind == "frozen"] == [96] and not finetune_work(steps)


def test_the_search_times_fold_0_and_its_schedule_is_fitted_again_to_the_time_left():
    """Planned with a margin before anything was timed; after the search, fold 0's epochs are what the
    time left buys (more than planned when there is room, fewer when not), and so are the other
    folds' once fold 0 is done (the run's own timing, not fold 0's count, sets them); the plan still
    ends within the budget."""
    f = facts(1200)
    costs = Costs(f, speeds())
    searched = lambda epochs: State(frozen={(B, 64): 0.8}, search={3.0: 0.5, 1.0: 0.4}, done={"floor"},
                                    finetune={"backbone": B, "size": 64, "rate": 3.0, "epochs": epochs, "done": []},
                                    spent={"frozen": 60.0, "finetune": 80.0})
    roomy = [s for s in plan(f, searched(3), costs, 150) if s.kind == "finetune"]
    assert [s.fold for s in roomy] == [0, 1, 2] and len({s.epochs for s in roomy}) == 1
    assert 3 < roomy[0].epochs <= EPOCHS_MAX and "as the run timed them" in roomy[0].why
    steps = plan(f, searched(3), costs, 150)
    assert 150 + total(steps) <= f.budget_s
    tight = [s for s in plan(f, searched(12), costs, 400) if s.kind == "finetune"]
    assert tight and tight[0].epochs < roomy[0].epochs < 12 and "of the 12 planned epochs fit" in tight[0].why
    # once fold 0 is done (4 epochs), the folds left get what the time left buys: more with room, fewer without
    done0 = searched(4)
    done0.finetune["done"] = [0]
    for elapsed, more in ((300, True), (1000, False)):
        steps = plan(f, done0, costs, elapsed)
        later = {s.epochs for s in steps if s.kind == "finetune"}
        assert len(later) == 1 and (later.pop() > 4) == more, (elapsed, later)
        assert elapsed + total(steps) <= f.budget_s


def test_when_no_fine_tuning_fits_after_its_search_the_sweep_takes_the_time_it_leaves():
    """As the search timed its epochs, fine-tuning may no longer fit: the frozen sweep takes the time
    (a 2-minute run had left 57 s unused), and with no time for that either, only the lone frozen run
    is exported (export's budget serves one run without an ensemble: test_distill)."""
    f = facts(600, n_train=2000, n_test=1000)
    costs = Costs(f, speeds())
    searched = lambda: State(frozen={(B, 64): 0.8}, search={3.0: 0.5, 1.0: 0.4}, done={"floor"},
                             finetune={"backbone": B, "size": 64, "rate": 3.0, "epochs": 6, "done": []},
                             spent={"frozen": 20.0, "finetune": 30.0})
    assert [s.kind for s in plan(f, searched(), costs, 450)][:3] == ["finetune"] * 3  # 2 epochs still fit
    steps = plan(f, searched(), costs, 500)
    assert [(s.kind, s.size) for s in steps] == [("frozen", 96), ("ensemble", 0), ("export", 0), ("infer", 0)]
    assert 500 + total(steps) <= f.budget_s
    assert [s.kind for s in plan(f, searched(), costs, 530)] == ["export", "infer"]


def test_epochs_the_run_timed_replace_the_prediction_from_the_measured_speed():
    """The speed measured on random images runs ahead of real epochs (data pipeline, augmentation):
    once the search timed its epochs, the schedule follows them. Epochs twice as slow as predicted
    get about half as many epochs, and the plan still ends within the budget."""
    f = facts(1200)
    state = State(frozen={(B, 64): 0.8}, search={3.0: 0.5}, done={"floor"}, spent={"frozen": 60.0, "finetune": 40.0},
                  finetune={"backbone": B, "size": 64, "rate": 3.0, "epochs": 6, "done": []})
    predicted = [s.epochs for s in plan(f, state, Costs(f, speeds()), 150) if s.kind == "finetune"]
    train_pass = f.n_train * 2 / 3 / RECORDED[64].train
    state.epoch_s = {epoch_key(B, 64): 2 * train_pass}
    costs = Costs(f, speeds(), timed=state.epoch_s)
    assert costs.epoch(B, 64) == pytest.approx(Costs(f, speeds()).epoch(B, 64) + train_pass)
    steps = plan(f, state, costs, 150)
    timed = [s.epochs for s in steps if s.kind == "finetune"]
    assert len(set(timed)) == 1 and 0.4 < timed[0] / predicted[0] < 0.7, (timed, predicted)
    assert 150 + total(steps) <= f.budget_s
    assert State.from_dict(json.loads(json.dumps(state.to_dict()))).epoch_s == state.epoch_s


def test_a_fold_under_way_takes_the_epochs_its_own_epochs_leave_room_for():
    """After each epoch a fine-tuned fold is planned again (``fold_epochs``): epochs that ran as timed
    keep the count planned at its start; faster ones buy more (with the margin); slower ones fewer,
    once its count no longer fits even without the margin (a little slower keeps it: a count that
    moved with each epoch's noise went 9, 8, 9, 10), but one more at least (only the deadline stops
    a fold); the plan still ends within the budget."""
    f = facts(1200)
    key, train_pass = epoch_key(B, 64), f.n_train * 2 / 3 / RECORDED[64].train
    state = State(frozen={(B, 64): 0.8}, search={3.0: 0.5}, done={"floor"}, spent={"frozen": 60.0, "finetune": 200.0},
                  finetune={"backbone": B, "size": 64, "rate": 3.0, "epochs": 5, "done": [0]},
                  epoch_s={key: train_pass})
    costs = Costs(f, speeds(), timed=state.epoch_s)
    start = 400.0
    planned = [s.epochs for s in plan(f, state, costs, start) if s.kind == "finetune"]
    assert planned[0] == planned[1] > 5  # fold 1's, at its start

    def after_two(pace: float, count: int) -> int:  # fold 1's first two epochs ran at ``pace`` times as timed
        state.epoch_s[key] = pace * train_pass
        state.finetune["running"] = [1, 2, count]
        elapsed = start + costs.scaled("finetune", SETUP_S) + 2 * costs.epoch(B, 64)
        steps = plan(f, state, costs, elapsed)
        assert elapsed + total(steps) <= f.budget_s, pace
        return fold_epochs(steps, 1, 2)

    counts = {pace: after_two(pace, planned[0]) for pace in (1.0, 0.6, 1.1, 1.6)}
    assert counts[1.0] == counts[1.1] == planned[0] and counts[0.6] > planned[0], (counts, planned)
    assert after_two(1.1, 0) < planned[0]  # (the margin alone would have cut it)
    assert 3 <= counts[1.6] < planned[0], (counts, planned)
    state.epoch_s[key] = 5 * train_pass  # not even one more epoch fits: one more, and the deadline stops it
    assert fold_epochs(plan(f, state, costs, 1100), 1, 2) == 3


def test_the_default_rate_goes_on_unless_another_leads_it_by_more_than_a_standard_error():
    from utils.data.schema import Schema
    from utils.ensemble.search import BlendObjective
    from utils.fit.run import choose_rate

    n, rng = 600, np.random.default_rng(0)
    schema = Schema({"c": ["a"]}, {"c/a": ["x", "y"]})
    truth, idx = np.arange(n) % 2, np.arange(n)

    def val(wrong_share):  # logits right on all images but a share
        pred = truth.copy()
        pred[rng.permutation(n)[: int(wrong_share * n)]] ^= 1
        logits = np.eye(2, dtype=np.float32)[pred]
        return logits, truth[:, None], idx

    vals = {3.0: val(0.20), 1.0: val(0.19), 10.0: val(0.10)}
    scores = {r: BlendObjective(v[0][None], v[1], schema).score(np.ones(1)) for r, v in vals.items()}
    assert scores[1.0] > scores[3.0]  # a lead of about 0.01, within one standard error (about 0.02)
    rate, why = choose_rate({r: scores[r] for r in (3.0, 1.0)}, vals, 3.0, schema)
    assert rate == 3.0 and "within one standard error" in why
    rate, why = choose_rate(scores, vals, 3.0, schema)  # a lead of about 0.10
    assert rate == 10.0 and "over one standard error" in why
    assert choose_rate({3.0: 0.9, 1.0: 0.8}, vals, 3.0, schema)[0] == 3.0  # the default leads
    assert choose_rate({3.0: 0.80, 1.0: 0.81}, {}, 3.0, schema) == (1.0, "the best (no logits of the same rows to "
                                                                        "weigh its lead: a resumed search)")


def test_too_small_a_budget_is_refused_naming_what_would_do():
    f = facts(40)
    with pytest.raises(BudgetTooSmall, match=r"too small.*give --budget \d+m or more"):
        plan(f, State(), Costs(f, speeds()), 0)
    # a budget that fits only the frozen route gets the frozen route, and no fine-tuning
    f = facts(240)
    steps = plan(f, State(), Costs(f, speeds()), 0)
    assert "frozen" in [s.kind for s in steps] and not finetune_work(steps)


class FakeStages:
    """Stages that take ``slow[kind]`` times the seconds the measured speeds predict, on a fake
    clock (as a machine slower than its measurements, the same at every stage: the prediction as
    first made, before the run's calibration); a training stage in epochs, asking ``budget.up()``
    after each as the fold trainer's report does, and a fine-tuned fold the plan as it stands (its
    epochs as ``fold_epochs`` says, while it has epochs left)."""

    def __init__(self, clock, slow: dict, costs: Costs):
        self.clock, self.slow, self.costs, self.ran = clock, slow, costs, []
        self.measured = set()

    def prepare(self, step):
        if step.backbone and (step.backbone, step.size) not in self.measured:
            self.measured.add((step.backbone, step.size))
            self.clock.t += 3  # measuring
            return True
        return False

    def first_plan(self, table):
        self.first = table

    def run(self, step, state, budget):
        kind = "finetune" if step.kind == "search" else step.kind
        # the search's epochs are fine-tuning's (unless the case says otherwise)
        slow = self.slow.get(step.kind, self.slow.get(kind, 1.0))
        seconds = step.seconds / self.costs.calibration.get(kind, 1.0) * slow
        if step.kind == "finetune" and state.finetune is None:
            state.finetune = {"backbone": step.backbone, "size": step.size, "rate": 1.0, "epochs": step.epochs,
                              "done": []}
        before = 1 if step.kind == "finetune" and step.fold == 0 and state.search else 0  # the search's epoch
        epochs = {"finetune": step.epochs - before, "search": len(step.rates)}.get(step.kind, 1)  # search: a rate each
        ran, planned = 0, epochs
        while ran < epochs:
            self.clock.t += seconds / planned
            ran += 1
            if budget.up():
                break
            if step.kind == "finetune" and ran < epochs:  # planned again after each epoch, as the real fold is
                state.finetune["running"] = [step.fold, before + ran, before + epochs]
                epochs = fold_epochs(budget.plan(), step.fold, before + ran) - before
        self.ran.append((step, before + ran if step.kind == "finetune" else ran))
        if step.kind == "frozen":
            state.frozen[(step.backbone, step.size)] = 0.8 + step.size / 10_000
        elif step.kind == "search":
            state.search = {r: 0.5 for r in step.rates[:ran]}
            state.finetune = {"backbone": step.backbone, "size": step.size, "rate": step.rates[0],
                              "epochs": step.epochs, "done": []}
        elif step.kind == "finetune":
            state.finetune.pop("running", None)
            state.finetune["done"].append(step.fold)
        else:
            state.done.add(step.kind)
        return "ok"


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


FASTER = {k: 0.3 for k in ("frozen", "search", "finetune", "ensemble", "export")}  # time left over at the end


MIXED = {"frozen": 2.0, "finetune": 1.2, "export": 1.5}


@pytest.mark.parametrize("slow", [{}, {"finetune": 1.2}, {"finetune": 2.5}, {"search": 1.0, "finetune": 2.5}, MIXED,
                                  FASTER])
def test_the_budget_holds_on_a_fake_clock_and_an_overrun_replans(slow, capsys):
    budget = 900
    f, clock = facts(budget), Clock()
    costs = Costs(f, speeds())
    stages = FakeStages(clock, slow, costs)
    report = execute(f, costs, stages, clock=clock)
    out = capsys.readouterr().out
    assert clock.t <= 1.1 * budget, report
    assert report["stage"].iloc[-2] == "infer" and report["stage"].iloc[-1] == "total"
    kinds = [s.kind for s, _ in stages.ran]
    assert kinds.index("frozen") < kinds.index("floor") < kinds.index("finetune") < kinds.index("export")
    last = min(kinds.index(k) for k in ("ensemble", "student", "export") if k in kinds)
    assert set(kinds[last:]) <= {"ensemble", "student", "export", "infer"}  # no training once they began
    first = [r for r in stages.first.to_dict("records") if r["stage"] == "finetune"]
    epochs = [s.epochs for s, _ in stages.ran if s.kind == "finetune"]
    if not slow:
        assert "re-planning" not in out
    ft_slow = slow.get("finetune", 1)
    if ft_slow > 1 + SLACK:  # the search or fold 0 overran its prediction
        assert "re-planning the rest" in out and "re-planned (" in out
    if ft_slow <= (1 + TIMED_MARGIN) * slow.get("search", ft_slow):  # the search timed fold 0: the later folds get
        assert min(epochs[1:]) >= epochs[0], epochs  # its epochs, or more from the margin it did not use
    else:  # fold 0 ran slower than the search timed it: the later folds got fewer epochs
        assert epochs[-1] < epochs[0], (epochs, first)
    # the actual seconds sit beside each prediction
    assert {"predicted s", "actual s"} <= set(report.columns) and report["actual s"].notna().all()


def test_a_stage_that_runs_into_the_later_stages_time_stops_after_its_epoch():
    # fine-tuning 6 times slower than measured, after a search that did not see it: a fold gives way
    f, clock = facts(600), Clock()
    costs = Costs(f, speeds())
    stages = FakeStages(clock, {"search": 1.0, "finetune": 6.0}, costs)
    execute(f, costs, stages, clock=clock)
    assert clock.t <= 1.1 * 600
    assert [s.kind for s, _ in stages.ran][-1] == "infer"
    assert any(ran < s.epochs for s, ran in stages.ran if s.kind == "finetune")
    # 14 times slower, the search too: it stops after its first rate, and nothing more is fine-tuned
    clock = Clock()
    costs = Costs(f, speeds())
    stages = FakeStages(clock, {"finetune": 14.0}, costs)
    execute(f, costs, stages, clock=clock)
    assert clock.t <= 1.1 * 600 and [s.kind for s, _ in stages.ran][-1] == "infer"
    search = [(s, ran) for s, ran in stages.ran if s.kind == "search"]
    assert len(search) == 1 and search[0][1] == 1 < len(search[0][0].rates)
    assert not [s for s, _ in stages.ran if s.kind == "finetune"]


# ----------------------------------------------------------------------------- fit.py itself

def test_fit_refuses_bad_input_before_any_work(tiny_data, other_data, tmp_path):
    out = tmp_path / "run"
    proc = run_script("fit.py", "--data-dir", str(tiny_data), "--out-dir", str(out), "--budget", "2s",
                      "--model", "test_efficientnet", "--progress", "false", check=False)
    assert proc.returncode == 2 and "is too small" in proc.stderr and "give --budget" in proc.stderr
    assert not (out / "embeddings").exists() and not (out / "decoded").exists()
    proc = run_script("fit.py", "--data-dir", str(tiny_data), "--out-dir", str(out), "--model", "test_efficientnet",
                      "--pretrained-file", str(tmp_path / "missing.pth"), check=False)
    assert proc.returncode == 2 and "missing.pth: no such file" in proc.stderr
    proc = run_script("fit.py", "--data-dir", str(other_data), "--out-dir", str(tmp_path / "o"), "--model",
                      "test_efficientnet", "--train-config", "configs/visual_taxonomy.yaml", check=False)
    assert proc.returncode == 2 and "category_aug" in proc.stderr and not (tmp_path / "o").exists()
    proc = run_script("fit.py", "--data-dir", str(tiny_data), "--budget", "ten", check=False)
    assert proc.returncode == 2 and "budget must be" in proc.stderr


@pytest.mark.slow
def test_fit_under_a_90_second_budget(other_data, tmp_path):
    """fit.py for real, on a small dataset of categories and attributes of its own."""
    out, sub = tmp_path / "run", tmp_path / "submission.csv"
    args = ("fit.py", "--data-dir", str(other_data), "--out-dir", str(out), "--budget", "90s", "--model",
            "test_efficientnet", "--output", str(sub), "--n-folds", "2", "--progress", "false")
    start = time.perf_counter()
    proc = run_script(*args)
    wall = time.perf_counter() - start
    assert wall <= 99, proc.stdout[-3000:]
    report = pd.read_csv(out / "fit" / "report.csv")
    assert report["stage"].tolist()[:2] == ["frozen", "floor"] and report["stage"].iloc[-2] == "infer"
    assert "finetune" in report["stage"].tolist()  # the small data leaves time to fine-tune
    assert report["actual s"].iloc[-1] <= 99
    test = pd.read_csv(other_data / "test.csv")
    assert sorted(pd.read_csv(sub)["id"]) == sorted(test["id"])
    assert "the plan (" in proc.stdout and "predicted and actual seconds" in proc.stdout
    # a re-run goes on from the state: nothing is trained again
    state = json.loads((out / "fit" / "state.json").read_text())["state"]
    assert state["finetune"]["done"] == [0, 1] and {"export", "infer"} <= set(state["done"])
    again = run_script(*args)
    assert "nothing to do" in again.stdout and "== python train.py" not in again.stdout
    assert "measured on this machine" not in again.stdout  # a complete run is not measured again
    pd.testing.assert_frame_equal(pd.read_csv(out / "fit" / "report.csv"), report)  # its report as it was
    # killed before its submission: the re-run makes only that, and its report keeps the first call's
    saved = json.loads((out / "fit" / "state.json").read_text())
    saved["state"]["done"].remove("infer")
    (out / "fit" / "state.json").write_text(json.dumps(saved))
    sub.unlink()
    resumed = run_script(*args)
    assert "resuming from" in resumed.stdout and "== python train.py" not in resumed.stdout
    both = pd.read_csv(out / "fit" / "report.csv")
    assert both["stage"].tolist() == report["stage"].tolist()[:-1] + ["total of an earlier call", "infer", "total"]
    assert sorted(pd.read_csv(sub)["id"]) == sorted(test["id"])


def test_the_ladder():
    assert ladder(224)[-1] == 224 and ladder(176)[-1] == 160 and ladder(32) == (LADDER[0],)


def test_no_training_once_the_last_stages_began():
    """With time left after the export (stages ran faster than predicted), the plan is what is left
    of the last stages: a frozen step up now would come after the ensemble it should have joined."""
    f = facts(900)
    ft = {"backbone": B, "size": 64, "rate": 3.0, "epochs": 4, "done": [0, 1, 2]}
    state = State(frozen={(B, 64): 0.8}, finetune=ft, done={"floor", "ensemble", "export"},
                  spent={"frozen": 20.0, "finetune": 100.0})
    assert [s.kind for s in plan(f, state, Costs(f, speeds()), 200)] == ["infer"]
    state.done.discard("export")
    assert [s.kind for s in plan(f, state, Costs(f, speeds()), 200)] == ["export", "infer"]


def test_a_replanned_fold_keeps_its_run_config():
    """A fold given fewer epochs by a re-plan is resumed: only epochs may change (train.py refuses
    another warm-up), so the warm-up follows the epochs first planned."""
    from utils.fit.plan import Step
    from utils.fit.run import FitConfig, Stages

    stages = Stages(FitConfig(model=["resnet18"]), None, None, native=28, costs=None)
    step = Step("finetune", "resnet18", 64, fold=0, epochs=4)
    planned, replanned = (stages.finetune_args(step, 3.0, e, 0, planned=4) for e in (4, 2))
    flag = lambda args, name: args[args.index(name) + 1]
    assert flag(planned, "--warmup-epochs") == flag(replanned, "--warmup-epochs") == "0.5"
    assert (flag(planned, "--epochs"), flag(replanned, "--epochs")) == ("4", "2")
    assert flag(planned, "--interpolation") == "cubic"  # 28-px images upscaled
    assert flag(planned, "--lr-backbone") == "0.0009"  # three times the base rate


def slowed_measurer(disturbed: dict):
    """A Measurer timing RECORDED; ``disturbed``: size -> (how many first timings, divided by what).
    Returns it and the sizes it timed, in order."""
    from dataclasses import replace

    from utils.fit.measure import Measurer

    m, calls = Measurer(None, None, None), []

    def time_it(backbone, size):
        calls.append(size)
        times, by = disturbed.get(size, (0, 1))
        sp = RECORDED[size]
        return replace(sp, train=sp.train / by, infer=sp.infer / by) if calls.count(size) <= times else sp
    m.time = time_it
    m.head_rate = lambda backbone: 14000.0
    return m, calls


def test_a_budget_that_looks_too_small_is_timed_again_before_it_is_refused(capsys):
    """Refusing is final: a first timing slowed 4x (speeds and the heads' rate) makes 150 s look too
    small; timed again, the budget fits and the run goes on with the faster timings. Timings that
    hold up are refused after the second look; a budget that fits is not timed again."""
    from dataclasses import replace

    from utils.fit.run import timed_again_before_refusing

    slowed = replace(facts(150), head_rows_per_s={B: 3500.0})
    with pytest.raises(BudgetTooSmall):
        plan(slowed, State(), Costs(slowed, speeds(4)), 0)
    m, calls = slowed_measurer({64: (1, 4)})
    m.measure(B, 64)
    kept = timed_again_before_refusing(slowed, State(), m, 0.0)
    out = capsys.readouterr().out
    assert "timing it again before refusing" in out and f"{B}: its heads 14,000 rows/s (the faster" in out
    assert calls == [64, 64] and m.measured[(B, 64)] == RECORDED[64] and kept.head_rows_per_s == {B: 14000.0}
    assert [s.kind for s in plan(kept, State(), Costs(kept, m.speed), 0)][0] == "frozen"
    m, calls = slowed_measurer({64: (2, 4)})  # slow both times: refused
    m.measure(B, 64)
    m.head_rate = lambda backbone: 3500.0
    with pytest.raises(BudgetTooSmall):
        timed_again_before_refusing(slowed, State(), m, 0.0)
    assert calls == [64, 64]
    m, calls = slowed_measurer({})
    m.measure(B, 64)
    assert timed_again_before_refusing(facts(150), State(), m, 0.0) == facts(150) and calls == [64]


def test_a_timing_that_disagrees_with_its_neighbour_size_is_taken_again():
    """A speed timed while something else ran (a quarter of the true one, as a 64-px timing read
    beside a starting Python process) disagrees per pixel with the next size's: the slower is timed
    again, the faster timing kept, and the plan's calibration, learnt against the first, dropped.
    Speeds that agree (the recorded ones) are timed once each. A larger size's own gain per pixel
    hides a disturbance of its timing up to about CONSISTENT / 1.9 on these speeds: it then looks
    dearer than it is, and the plan errs towards the smaller size."""
    from utils.fit.plan import Step
    from utils.fit.run import FitConfig, Stages

    m, calls = slowed_measurer({})
    m.measure(B, 64), m.measure(B, 96), m.measure(B, 128)
    assert calls == [64, 96, 128] and not m.retimed
    for first, disturbed in ((64, {64: (1, 4)}), (96, {96: (1, 8)})):  # the earlier timing slowed, or the later
        m, calls = slowed_measurer(disturbed)
        m.measure(B, 64), m.measure(B, 96)
        assert calls == [64, 96, first] and m.measured[(B, first)] == RECORDED[first]
        assert [r[:2] for r in m.retimed] == [(B, first)]
    m, calls = slowed_measurer({96: (1, 4)})  # within what a larger size gains per pixel: kept as timed
    m.measure(B, 64), m.measure(B, 96)
    assert calls == [64, 96] and m.measured[(B, 96)].train == RECORDED[96].train / 4
    m, calls = slowed_measurer({64: (5, 4)})  # slowed every time: timed again once, not again and again
    m.measure(B, 64), m.measure(B, 96), m.measure(B, 128)
    assert calls == [64, 96, 64, 128] and m.measured[(B, 64)].train == RECORDED[64].train / 4
    # fit.py's stage measuring 96 px drops the calibration that the slowed 64 px taught; agreeing timings keep it
    for disturbed, kept in (({64: (1, 4)}, {}), ({}, {"frozen": 0.27})):
        m, calls = slowed_measurer(disturbed)
        m.measure(B, 64)
        costs = Costs(facts(600), m.speed, calibration={"frozen": 0.27})
        stages = Stages(FitConfig(model=[B]), None, m, native=28, costs=costs)
        assert stages.prepare(Step("frozen", B, 96)) and costs.calibration == kept
