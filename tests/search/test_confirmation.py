"""Representative figures: balanced subsets, the hold-out split, paired intervals, confirmation of the front and
the selection on confirmed drops."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dsm_tune.evaluation.data import evaluation_order, select_part, split_positions
from dsm_tune.evaluation.intervals import agreement_interval, mean_interval, top1_interval
from dsm_tune.evaluation.metrics import _Tally
from dsm_tune.merging import load_config
from dsm_tune.search.confirmation import MAX_CANDIDATES, candidates, confirm_front
from dsm_tune.search.results import CONFIRM_ATTR, trials_frame
from dsm_tune.search.select import (
    NoWinnerError, Rule, SelectionError, effective_basis, freeze_trial, pick_winner, selection_record,
)
from dsm_tune.search.spec import LEGACY_IDENTITY, StudySpec
from tests.helpers.synthetic_study import add_measured, create_study, make_config


# --- balanced subsets ------------------------------------------------------------------------------------------
def _imagenet_like_labels(classes: int = 1000, per_class: int = 3) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)


def test_a_prefix_shorter_than_the_class_count_covers_the_whole_label_range():
    labels = _imagenet_like_labels()
    prefix = labels[evaluation_order(labels, 128, seed=0)]
    assert len(set(prefix.tolist())) == 128            # one image per class in the first round
    deciles = np.histogram(prefix, bins=10, range=(0, 1000))[0]
    assert (deciles > 0).all(), deciles                 # every tenth of the label range is sampled
    assert prefix.min() < 100 and prefix.max() >= 900


def test_the_old_class_prefix_order_is_what_legacy_studies_keep():
    labels = _imagenet_like_labels()
    prefix = labels[evaluation_order(labels, 128, seed=0, order="class-prefix")]
    assert sorted(prefix.tolist()) == list(range(128))  # the bias: the first classes only


def test_prefixes_of_the_balanced_order_stay_stratified():
    labels = _imagenet_like_labels(classes=10, per_class=50)
    order = evaluation_order(labels, None, seed=3)
    for n in (10, 20, 100, 250):
        counts = np.bincount(labels[order[:n]], minlength=10)
        assert counts.max() - counts.min() <= 1
    assert sorted(order.tolist()) == list(range(len(labels)))


def test_the_hold_out_split_is_disjoint_balanced_and_independent_of_the_limit():
    labels = _imagenet_like_labels(classes=100, per_class=10)
    search = select_part(labels, None, 0, part="search", holdout=0.2)
    confirm = select_part(labels, None, 0, part="confirm", holdout=0.2)
    assert not set(search.tolist()) & set(confirm.tolist())
    assert len(search) + len(confirm) == len(labels) and len(confirm) == 200
    assert len(set(labels[confirm[:100]].tolist())) == 100         # a confirm prefix is balanced on its own
    assert set(np.bincount(labels[confirm], minlength=100).tolist()) == {2}   # 20% of every class
    limited = select_part(labels, 50, 0, part="search", holdout=0.2)
    assert list(limited) == list(search[:50])                      # --limit takes a prefix of the same part
    assert not set(limited.tolist()) & set(select_part(labels, 50, 0, part="confirm", holdout=0.2).tolist())
    assert split_positions(10, 0.0).sum() == 0
    one_per_class = np.arange(1000)
    held = select_part(one_per_class, None, 0, part="confirm", holdout=0.2)
    assert len(held) == 200 and np.histogram(held, bins=10, range=(0, 1000))[0].min() > 5


# --- intervals -------------------------------------------------------------------------------------------------
def _draw_top1(rng: torch.Generator, n: int, flip: float, dense_right: float = 0.8):
    """Dense and merged logits on n images: merged flips a dense-right prediction with probability `flip` and
    fixes a dense-wrong one with probability flip / 4. Returns the tally inputs and the true expected drop."""
    classes = 10
    labels = torch.randint(0, classes, (n,), generator=rng)
    right = torch.rand(n, generator=rng) < dense_right
    dense_pred = torch.where(right, labels, (labels + 1) % classes)
    u = torch.rand(n, generator=rng)
    merged_pred = torch.where(right & (u < flip), (labels + 2) % classes, dense_pred)
    merged_pred = torch.where(~right & (u < flip / 4), labels, merged_pred)
    dense = torch.nn.functional.one_hot(dense_pred, classes).float()
    merged = torch.nn.functional.one_hot(merged_pred, classes).float()
    true_drop = 100 * (dense_right * flip - (1 - dense_right) * flip / 4)
    return dense, merged, labels, dense_pred == labels, true_drop


@pytest.mark.parametrize("n,flip", [(400, 0.03), (200, 0.08)])
def test_top1_interval_covers_the_true_drop_about_95_percent_of_the_time(n, flip):
    rng = torch.Generator().manual_seed(0)
    covered = 0
    draws = 400
    for _ in range(draws):
        dense, merged, labels, dense_correct, true_drop = _draw_top1(rng, n, flip)
        tally = _Tally("top1", int(dense_correct.sum()))
        tally.add(merged, dense, labels, dense_correct)
        result = tally.result(100.0 * float(dense_correct.float().mean()), n, n, aborted=False)
        assert result.ci_low <= result.drop <= result.ci_high
        covered += result.ci_low <= true_drop <= result.ci_high
    assert 0.90 <= covered / draws <= 0.99, covered / draws


def test_agreement_and_feature_intervals_cover_their_true_means():
    rng = random.Random(1)
    draws, n = 400, 300
    agree_hits = feature_hits = 0
    for _ in range(draws):
        disagreed = sum(rng.random() < 0.04 for _ in range(n))
        interval = agreement_interval(n, disagreed)
        agree_hits += interval.low <= 4.0 <= interval.high
        distances = [rng.expovariate(1 / 0.5) for _ in range(n)]   # mean 0.5 points, skewed like 1 - cosine
        interval = mean_interval(n, sum(distances), sum(d * d for d in distances))
        feature_hits += interval.low <= 0.5 <= interval.high
    assert 0.90 <= agree_hits / draws <= 0.99
    assert 0.90 <= feature_hits / draws <= 0.99


def test_no_flip_on_a_few_hundred_images_is_not_proof_of_no_drop():
    interval = top1_interval(200, lost=0, gained=0)
    assert interval.low < 0 < interval.high and interval.high > 0.3   # not a zero-width interval at 0
    assert agreement_interval(200, 0).high > 0.5


def test_intervals_refuse_an_empty_image_set():
    with pytest.raises(ValueError):
        top1_interval(0, 0, 0)


# --- selection -------------------------------------------------------------------------------------------------
def _confirmed_study(tmp_path, scores=None):
    """Four measured trials, fastest first: the two fastest pass the search limit but not confirmation."""
    study, _ = create_study(tmp_path, "conf")
    figures = [(0.9, 5.0), (0.85, 6.0), (0.5, 7.0), (0.2, 8.5)]
    for i, (drop, latency) in enumerate(figures):
        add_measured(study, make_config(1, 0, [0.05 * (i + 1)]), drop, latency,
                     figures={"accuracy_drop_ci_low": drop - 0.4, "accuracy_drop_ci_high": drop + 0.4})
    if scores is not None:
        study.set_user_attr(CONFIRM_ATTR, {"data_fingerprint": "held-out", "scores": scores})
    return study


def _score(drop, low, high, n=400):
    return {"confirmed_drop": drop, "confirmed_drop_ci_low": low, "confirmed_drop_ci_high": high,
            "confirmed_num_images": n}


def test_default_selection_is_the_fastest_whose_confirmed_drop_is_within_the_limit(tmp_path):
    study = _confirmed_study(tmp_path, {"0": _score(1.3, 0.9, 1.7), "1": _score(0.8, 0.4, 1.2),
                                        "2": _score(0.6, 0.3, 0.9)})
    frame = trials_frame(study)
    assert pick_winner(frame, Rule(basis="search"), 1.0) == 0        # today's: fooled by the winner's curse
    assert pick_winner(frame, Rule(), 1.0) == 1
    assert pick_winner(frame, Rule(basis="conservative"), 1.0) == 2
    assert selection_record(frame, Rule(), 1.0) == {"rule": "fastest with confirmed accuracy drop <= 1",
                                                     "basis": "confirmed"}
    frozen = freeze_trial(study, 1, selection_record(frame, Rule(), 1.0))
    metrics = frozen.metrics
    assert metrics["confirmed_drop"] == 0.8 and metrics["confirmed_num_images"] == 400
    assert metrics["accuracy_drop_ci_high"] == pytest.approx(0.85 + 0.4)
    assert metrics["selection"]["basis"] == "confirmed"
    assert load_config(frozen.to_json()).metrics["confirmed_drop_ci_low"] == 0.4


def test_unconfirmed_studies_fall_back_to_the_search_drop_and_say_so(tmp_path):
    frame = trials_frame(_confirmed_study(tmp_path))
    assert effective_basis(frame, Rule()) == "search"
    assert pick_winner(frame, Rule(), 1.0) == 0
    assert selection_record(frame, Rule(), 1.0)["basis"] == "search"


def test_no_confirmed_trial_within_the_limit_names_the_closest(tmp_path):
    study = _confirmed_study(tmp_path, {"0": _score(1.3, 0.9, 1.7), "1": _score(1.2, 0.8, 1.6)})
    with pytest.raises(NoWinnerError, match=r"confirmed accuracy drop <= 1 .*closest: trial 1.*confirmed 1.2"):
        pick_winner(trials_frame(study), Rule(), 1.0)
    with pytest.raises(SelectionError, match="unknown selection basis"):
        Rule(basis="optimistic")


def test_frozen_configs_without_the_new_figures_still_load(tmp_path):
    study = _confirmed_study(tmp_path)
    document = json.loads(freeze_trial(study, 0).to_json())
    for key in ("accuracy_drop_ci_low", "accuracy_drop_ci_high", "selection"):
        document["metrics"].pop(key, None)
    assert document["version"] == 1
    assert load_config(json.dumps(document)).metrics["accuracy_drop"] == 0.9


# --- confirming the front ----------------------------------------------------------------------------------------
class _StandInScorer:
    """Confirms each config at its search drop + 0.3 (the winner's curse, made visible)."""

    def __init__(self, study, fingerprint="held-out"):
        self.data_fingerprint, self.num_images, self.scored = fingerprint, 400, []
        self._drops = {json.dumps(t.user_attrs["config"], sort_keys=True): t.user_attrs["accuracy_drop"]
                       for t in study.trials}

    def score(self, cfg):
        key = json.dumps(cfg.replace(model=None).to_dict(), sort_keys=True)
        drop = self._drops[key] + 0.3
        self.scored.append(key)
        return SimpleNamespace(drop=drop, ci_low=drop - 0.2, ci_high=drop + 0.2, num_images=400)


def test_confirm_front_scores_the_feasible_front_fastest_first_and_reuses_its_scores(tmp_path):
    study = _confirmed_study(tmp_path)
    frame = trials_frame(study)
    built = []

    def make(fingerprint="held-out"):
        scorer = _StandInScorer(study, fingerprint)
        built.append(scorer)
        return scorer

    lines = []
    assert candidates(frame, 1.0) == [0, 1, 2, 3][:MAX_CANDIDATES]
    assert confirm_front(study, frame, 1.0, make, lines.append) == 4
    confirmed = trials_frame(study)
    assert confirmed.set_index("number")["confirmed_drop"].to_dict() == pytest.approx(
        {0: 1.2, 1: 1.15, 2: 0.8, 3: 0.5})
    assert "confirming 4 front candidate(s) on 400 held-out images" in lines[0]
    # A resumed study reuses what it has: no scorer is even built.
    assert confirm_front(study, confirmed, 1.0, make, lines.append) == 0 and len(built) == 1
    assert pick_winner(trials_frame(study), Rule(), 1.0) == 2


def test_changed_confirmation_images_are_scored_again(tmp_path):
    study = _confirmed_study(tmp_path, {"0": _score(1.3, 0.9, 1.7)})
    scorer = _StandInScorer(study, "other-images")
    assert confirm_front(study, trials_frame(study), 1.0, lambda: scorer, lambda _: None) == 4
    assert study.user_attrs[CONFIRM_ATTR]["data_fingerprint"] == "other-images"


# --- old studies -------------------------------------------------------------------------------------------------
def test_a_study_stored_before_the_data_settings_keeps_its_images():
    spec = StudySpec(model="demo", study="old")
    stored = {k: v for k, v in spec.to_dict().items() if k not in LEGACY_IDENTITY}
    note = spec.adopt_legacy(stored)
    assert note is not None and "keeps its images" in note and "\n" not in note
    assert (spec.confirm, spec.data_order, spec.confirm_data) == (0.0, "class-prefix", None)
    spec.check_same_study({**stored, **LEGACY_IDENTITY})
    assert StudySpec(model="demo").adopt_legacy(StudySpec(model="demo").to_dict()) is None


@pytest.mark.parametrize("bad", [1.0, -0.1, "x", True])
def test_confirm_must_be_a_fraction(bad):
    with pytest.raises(Exception, match="--confirm must be a fraction"):
        StudySpec(model="demo", confirm=bad)


# --- verify --data -----------------------------------------------------------------------------------------------
def test_verify_on_other_images_fails_only_when_the_whole_interval_is_over_the_limit():
    from dsm_tune.commands.verify import interval_row

    within = {"accuracy_drop_ci_low": 0.7, "accuracy_drop_ci_high": 1.6}
    over = {"accuracy_drop_ci_low": 1.1, "accuracy_drop_ci_high": 1.9}
    assert interval_row(within, 1.0, deciding=True)["ok"] is True
    assert interval_row(over, 1.0, deciding=True)["ok"] is False
    assert interval_row(over, 1.0, deciding=False)["ok"] is None        # without --data it is shown only
    assert interval_row(over, None, deciding=True)["ok"] is None        # a file that records no limit
    assert interval_row(within, 1.0, deciding=True)["text"] == "[0.700, 1.600]"


def test_verify_rescores_the_study_s_own_search_images():
    from dsm_tune.commands.verify import study_images

    labels = np.repeat(np.arange(10), 6)
    provenance = {"data_order": "balanced", "data_seed": 3, "confirm": 0.2, "confirm_data": None}
    drawn = study_images(provenance)
    assert drawn == {"order": "balanced", "seed": 3, "holdout": 0.2}
    searched = select_part(labels, 24, 3, "balanced", part="search", holdout=0.2)
    assert np.array_equal(select_part(labels, 24, part="search", **drawn), searched)
    # A separate confirmation folder left every --data image to the search; a file from before the split kept
    # the class-prefix order with nothing held out.
    assert study_images({**provenance, "confirm_data": "/held"})["holdout"] == 0.0
    assert study_images({}) == {"order": "class-prefix", "seed": 0, "holdout": 0.0}


# --- end to end on the demo ----------------------------------------------------------------------------------------
def test_a_demo_study_confirms_its_front_and_export_chooses_on_it(tmp_path, capsys):
    from dsm_tune.cli import main
    from dsm_tune.search.folder import StudyFolder

    out = tmp_path / "runs"
    assert main(["run", "--model", "demo", "--device", "cpu", "--trials", "4", "--no-ray", "--no-mlflow",
                 "--limit", "120", "--out", str(out)]) == 0
    study = StudyFolder(out, "demo-cpu").load()
    spec = study.user_attrs["spec"]
    assert (spec["confirm"], spec["data_order"], spec["data_seed"]) == (0.2, "balanced", 0)
    frame = trials_frame(study)
    measured = frame[frame["accuracy_drop"].notna()]
    assert (measured["accuracy_drop_ci_low"] <= measured["accuracy_drop"]).all()
    assert (measured["accuracy_drop"] <= measured["accuracy_drop_ci_high"]).all()
    scores = study.user_attrs.get(CONFIRM_ATTR, {}).get("scores", {})
    front = candidates(frame, 1.0)
    assert sorted(int(n) for n in scores) == sorted(front)
    # 20% of the 2,000-image slice is held out, capped by --limit like the search part.
    assert all(s["confirmed_num_images"] == 120 for s in scores.values())
    capsys.readouterr()
    assert main(["report", "--study", "demo-cpu", "--out", str(out), "--all"]) == 0
    assert "confirmed_95ci" in capsys.readouterr().out
    target = tmp_path / "dsm.json"
    code = main(["export", "--study", "demo-cpu", "--out", str(out), "-o", str(target), "--on-search"])
    if code == 0:   # a 4-trial study on a loaded machine may have no quiet speedup within the limit
        metrics = load_config(target.read_text()).metrics
        assert metrics["selection"]["basis"] == "search" and "accuracy_drop_ci_high" in metrics
    if front:
        assert main(["export", "--study", "demo-cpu", "--out", str(out), "-o", str(target), "--force",
                     "--trial", str(front[0])]) == 0
        metrics = load_config(target.read_text()).metrics
        assert metrics["confirmed_drop"] == pytest.approx(scores[str(front[0])]["confirmed_drop"])
        assert metrics["confirmed_num_images"] == 120
