from pathlib import Path

import pytest

from selftrain.config import Config, ConfigError, build_config, dump_config, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def test_defaults_are_the_demo_recipe():
    cfg = load_config(None)
    assert cfg.data.labeled == "fashion-mnist:train" and cfg.data.label_fraction == 0.01
    assert cfg.stages == ["teach", "label", "student", "transfer"]


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as err:
        build_config({"student": {"stepz": 5}})
    msg = str(err.value)
    assert "student.stepz: unknown key" in msg and "did you mean 'steps'" in msg and "human_batch_size" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="studnet: unknown key.*allowed: name, seed"):
        build_config({"studnet": {}})


def test_bad_value_names_key_and_allowed():
    with pytest.raises(ConfigError) as err:
        build_config({"student": {"augment": "S9"}})
    assert "student.augment" in str(err.value) and "'S4'" in str(err.value)
    with pytest.raises(ConfigError, match="data.label_fraction"):
        build_config({"data": {"label_fraction": 1.5}})


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown task 'panoptic'; known: alignment3d, au, classification, depth, detection, emotion"):
        build_config({"task": "panoptic"})


def test_task_the_stages_do_not_run_yet_is_refused_clearly(monkeypatch):
    from selftrain import config

    # Every registered task runs in the stages now; a new one is refused until it is listed.
    monkeypatch.setattr(config, "PIPELINE_TASKS", ("classification", "segmentation"))
    with pytest.raises(ConfigError, match="task 'keypoints' has its head.*tasks the stages run: classification, segmentation"):
        build_config({"task": "keypoints"})
    assert build_config({"task": "segmentation"}).task == "segmentation"
    monkeypatch.undo()
    assert build_config({"task": "keypoints"}).task == "keypoints"  # the dense tasks the stages run


def test_dotted_overrides_parse_yaml_values():
    cfg = build_config({}, ["student.steps=5", "label.hard=true", "transfer.protocols=[evaluate, linear]", "model.weights="])
    assert cfg.student.steps == 5 and cfg.label.hard is True
    assert cfg.transfer.protocols == ["evaluate", "linear"] and cfg.model.weights is None


def test_override_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config({}, ["student.steps"])
    with pytest.raises(ConfigError, match="'seed' is a value"):
        build_config({"seed": 3}, ["seed.x=1"])


def test_stages_are_put_in_pipeline_order():
    assert build_config({"stages": ["transfer", "teach"]}).stages == ["teach", "transfer"]


def test_dump_round_trips(tmp_path):
    cfg = build_config({}, ["student.rounds=2"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path, tmp_path):
    if "study" in path.relative_to(path.parents[1]).parts:  # a study: its base and every cell's config
        from selftrain.study import load_study, validate

        study, base = load_study(path)
        assert validate(study, base, tmp_path)
    elif "faces" in path.relative_to(path.parents[1]).parts:  # a face benchmark: every cell's run config
        from selftrain.faces import cell_config, load_benchmark, plan

        bench = load_benchmark(path)
        cells = plan(bench)
        assert cells and all(isinstance(cell_config(bench, c, tmp_path, tmp_path / "data"), Config) for c in cells)
    else:
        assert isinstance(load_config(path), Config)


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 2
