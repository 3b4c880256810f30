"""`dsm-tune run --probe`: the study starts from the narrowed space, samples inside it, records what was narrowed
and why (spec.json, the study's spec attr, the MLflow parent tags), resumes on the same space, and refuses a
space that pins the start layer in one line."""

from __future__ import annotations

import io
import json

import pytest
import yaml

from dsm_tune.cli import build_parser, main
from dsm_tune.commands.run import build_spec
from dsm_tune.evaluation.probe import BlockStats, ProbeResult, convergence_rule
from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.probe_narrow import NARROWED_SPACE, PROBE_COPY, ProbeNarrowError, narrow_study_space
from dsm_tune.search.results import load_study
from dsm_tune.search.space import SPACES_DIR, parse_space
from dsm_tune.search.study import StudySpec, resume_spec, run_study
from dsm_tune.search.testing import StandInFactory
from dsm_tune.search.tracking.runs import parent_tags

DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
SAMPLED_DEMO = SPACES_DIR / "sampled" / "demo.yaml"   # start_layer_fraction [0, 0.5] -> blocks 0..3


def demo_probe(convergence: int = 3, model: str = "demo") -> ProbeResult:
    similarity = [0.3, 0.5, 0.6, 0.7, 0.72, 0.8]
    blocks = tuple(BlockStats(block=i, entropy=0.9, sink_share=0.05, sink_tokens=(0,), outlier_count=0.0,
                              outlier_tokens=(), neighbour_similarity=s,
                              similarity_change=None if i == 0 else s - similarity[i - 1])
                   for i, s in enumerate(similarity))
    return ProbeResult(model=model, num_blocks=6, num_tokens=257, num_prefix_tokens=1, grid=(16, 16), num_images=4,
                       data="synthetic", blocks=blocks, convergence_block=convergence, rule=convergence_rule())


def spec_for(tmp_path, **changes) -> StudySpec:
    fields = dict(model="demo", target="cpu", trials=8, workers=1, out=tmp_path, mlflow=False, study="probed",
                  space=str(SAMPLED_DEMO))
    fields.update(changes)
    return StudySpec(**fields)


def test_narrow_study_space_writes_the_probe_and_the_narrowed_space(tmp_path):
    spec = spec_for(tmp_path)
    explanation = narrow_study_space(spec, demo_probe(3))
    folder = tmp_path / "probed"
    assert spec.space == str(folder / NARROWED_SPACE) and spec.probe == str(folder / PROBE_COPY)
    assert spec.probe_narrowing == explanation
    assert explanation["space_source"] == str(SAMPLED_DEMO)
    assert explanation["start_layer"]["before"] == [0, 3] and explanation["start_layer"]["after"] == [2, 4]
    # 0.7 / 0.8 of the first stage's [0, 0.5]
    assert explanation["first_stage"]["after"] == [0.0, 0.43]
    assert explanation["summary"].startswith("convergence block 3; start_layer [0, 3] -> [2, 4]")
    space = parse_space((folder / NARROWED_SPACE).read_text(), DEMO)
    assert space.start_layer == (2, 4) and space.stage_ratio[0] == (0.0, 0.43)
    assert json.loads((folder / PROBE_COPY).read_text())["convergence_block"] == 3
    json.dumps(spec.to_dict())   # stored as the study's spec attr and spec.json


def test_a_probe_of_another_model_is_refused(tmp_path):
    with pytest.raises(ProbeNarrowError, match="measured on vit_base_patch16_224, the study tunes demo"):
        narrow_study_space(spec_for(tmp_path), demo_probe(model="vit_base_patch16_224"))


def test_run_probe_on_a_space_that_pins_the_start_layer_is_one_line(tmp_path, capsys):
    pinned = yaml.safe_load(SAMPLED_DEMO.read_text())
    del pinned["start_layer_fraction"]
    pinned["start_layer"] = 2
    space = tmp_path / "pinned.yaml"
    space.write_text(yaml.safe_dump(pinned))
    probe = tmp_path / "probe.json"
    demo_probe(3).to_json(probe)
    code = main(["run", "--model", "demo", "--space", str(space), "--probe", str(probe), "--out", str(tmp_path),
                 "--study", "pinned", "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dsm-tune: error: the search space pins the start layer (start_layer: 2 -> block 2)")
    assert err.count("\n") == 1
    assert not (tmp_path / "pinned").exists()


def test_a_probe_file_that_is_not_one_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code = main(["run", "--model", "demo", "--probe", str(bad), "--out", str(tmp_path), "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a dsm-tune probe result" in err and err.count("\n") == 1


def test_probe_flag_without_a_file_means_probe_here():
    args = build_parser().parse_args(["run", "--model", "demo", "--probe", "--trials", "3"])
    assert args.probe == "" and args.trials == 3
    assert build_parser().parse_args(["run", "--model", "demo"]).probe is None


def test_parent_run_tags_say_what_was_narrowed(tmp_path):
    spec = spec_for(tmp_path)
    narrow_study_space(spec, demo_probe(3))
    tags = parent_tags("probed", tmp_path / "probed", {"spec": spec.to_dict()}, "dsm_tune_demo_vit", "cpu")
    assert tags["probe_narrowing"] == spec.probe_narrowing["summary"]
    assert "probe_narrowing" not in parent_tags("plain", tmp_path, {"spec": spec_for(tmp_path).to_dict()},
                                                "dsm_tune_demo_vit", "cpu")


@pytest.fixture(scope="module")
def ray_session():
    from dsm_tune.search.workers import start_ray, stop_ray

    started = start_ray(None, num_cpus=2)
    yield
    stop_ray(started)


@pytest.mark.slow
def test_a_probed_study_samples_inside_the_narrowed_range_and_resumes(tmp_path, ray_session, capsys):
    spec = spec_for(tmp_path, trials=8)
    narrow_study_space(spec, demo_probe(3))
    run_study(spec, evaluator_factory=StandInFactory(DEMO, cost_s=0.0), stream=io.StringIO())
    study = load_study(spec.study_dir)
    sampled = [t for t in study.get_trials() if t.user_attrs.get("seed_kind") is None]
    assert sampled and all(2 <= t.params["start_layer"] <= 4 for t in sampled)
    stored = study.user_attrs["spec"]
    assert stored["probe_narrowing"]["start_layer"]["after"] == [2, 4]
    assert json.loads((spec.study_dir / "spec.json").read_text())["probe_narrowing"] == stored["probe_narrowing"]
    assert (spec.study_dir / "space.yaml").read_text() == (spec.study_dir / NARROWED_SPACE).read_text()

    # A resume (by --study alone, or by the same command line with --probe) runs on the same narrowed space.
    resumed = resume_spec(tmp_path, "probed", trials=10)
    assert resumed.probe_narrowing == stored["probe_narrowing"]
    run_study(resumed, evaluator_factory=StandInFactory(DEMO, cost_s=0.0), stream=io.StringIO())
    again = build_spec(build_parser().parse_args(
        ["run", "--model", "demo", "--study", "probed", "--out", str(tmp_path), "--probe", "elsewhere.json"]))
    assert again.space == spec.space and again.probe_narrowing == stored["probe_narrowing"]
    assert len([t for t in load_study(spec.study_dir).get_trials() if t.state.name == "COMPLETE"]) >= 9


def test_probe_on_a_study_started_without_it_is_refused(tmp_path, ray_session, capsys):
    spec = spec_for(tmp_path, trials=2, study="plain")
    run_study(spec, evaluator_factory=StandInFactory(DEMO, cost_s=0.0), stream=io.StringIO())
    code = main(["run", "--study", "plain", "--out", str(tmp_path), "--probe", "x.json", "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and "was started without --probe" in err and err.count("\n") == 1
