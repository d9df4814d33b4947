"""The service's ``[tracker]`` section: generated from `TrackerConfig`, checked by it, and
read under its old ``[analysis] tracker_*`` names too."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from focaltrack.daemon import config as C
from focaltrack.daemon.config import ConfigError, load_config, tracker_settings
from focaltrack.models.tracker_config import (
    NOISE_FROM_MODEL,
    NOISE_SETTINGS,
    MotionModel,
    TrackerConfig,
)

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "f.toml"
    p.write_text(text, "utf-8")
    return p


def test_tracker_section_is_trackerconfigs_fields_with_its_defaults() -> None:
    config_fields = dataclasses.fields(TrackerConfig)
    section = {f.name: f for f in dataclasses.fields(C.TrackerSection)}
    assert list(section) == [f.name for f in config_fields]
    for f in config_fields:
        s = section[f.name]
        if f.name in NOISE_SETTINGS:  # 0 = from the model's validation
            assert s.default == NOISE_FROM_MODEL and "model's validation" in s.metadata["help"]
        elif isinstance(f.default, MotionModel):
            assert s.default == f.default.value
            assert s.metadata["choices"] == tuple(m.value for m in MotionModel)
        else:
            assert s.default == f.default and type(s.default) is type(f.default)
        assert s.metadata["help"].startswith(f.metadata["help"])
    # The shipped example and the schema list the same keys.
    example = C.tomllib.loads((REPO / "deploy" / "focaltrack.toml").read_text("utf-8"))
    assert list(example["tracker"]) == list(section)
    assert list(C.config_schema()["properties"]["tracker"]["properties"]) == list(section)
    # Without a model's noise, the default section is the default tracker.
    cfg = load_config(None, env={})
    assert TrackerConfig.from_settings(tracker_settings(cfg.tracker)) == TrackerConfig()


def test_tracker_settings_from_every_layer(tmp_path: Path) -> None:
    p = _write(
        tmp_path, '[tracker]\nmotion = "random_walk"\nmax_tracks = 50\ngate_probability = 0.99\n'
    )
    env = {"FOCALTRACK_TRACKER_MAX_TRACKS": "60", "FOCALTRACK_TRACKER_SIGMA_AXIAL_UM": "2"}
    cfg = load_config(p, env=env, overrides={"tracker.max_tracks": 70})
    assert cfg.tracker.motion == "random_walk" and cfg.tracker.gate_probability == 0.99
    assert cfg.tracker.max_tracks == 70 and cfg.tracker.sigma_axial_um == 2.0
    made = TrackerConfig.from_settings(tracker_settings(cfg.tracker))
    assert made.motion is MotionModel.RANDOM_WALK and made.max_tracks == 70
    assert made.sigma_axial_um == 2.0 and made.sigma_lateral_um == TrackerConfig().sigma_lateral_um


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[tracker]\ngate_probability = 1.5\n", r"tracker\.gate_probability in .*f\.toml"),
        ("[tracker]\nsigma_lateral_um = -1\n", r"tracker\.sigma_lateral_um in .*positive"),
        ("[tracker]\nmax_misses = 0\n", r"tracker\.max_misses in .*at least 1"),
        (
            "[tracker]\nconfirm_hits = 7\n",
            r"tracker\.confirm_hits in .* and tracker\.confirm_window \(default\)",
        ),
        ("[tracker]\nmotion = 'teleport'\n", r"tracker\.motion"),
        ("[tracker]\nmax_tracks = 1.5\n", r"tracker\.max_tracks"),
        ("[tracker]\nsigma = 1\n", r"tracker\.sigma"),
        ("[analysis]\ntracker_max_misses = 0\n", r"analysis\.tracker_max_misses in .*at least 1"),
    ],
)
def test_tracker_values_are_checked_by_trackerconfig(
    tmp_path: Path, text: str, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(_write(tmp_path, text), env={})


@pytest.mark.parametrize("layer", ["file", "env", "override"])
def test_old_analysis_tracker_keys_map_to_tracker_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, layer: str
) -> None:
    path, env, overrides = None, {}, {}
    if layer == "file":
        path = _write(tmp_path, '[analysis]\ntracker_motion = "random_walk"\n')
    elif layer == "env":
        env = {"FOCALTRACK_ANALYSIS_TRACKER_MOTION": "random_walk"}
    else:
        overrides = {"analysis.tracker_motion": "random_walk"}
    with caplog.at_level(logging.WARNING, logger="focaltrack.config"):
        cfg = load_config(path, env=env, overrides=overrides)
    assert cfg.tracker.motion == "random_walk"
    assert cfg == load_config(None, env={}, overrides={"tracker.motion": "random_walk"})
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "analysis.tracker_motion" in warned[0] and "tracker.motion" in warned[0]
    assert "deprecated" in warned[0]


def test_every_old_tracker_key_is_read() -> None:
    old = {
        "analysis.tracker_motion": "random_walk",
        "analysis.tracker_sigma_lateral_um": 0.2,
        "analysis.tracker_sigma_axial_um": 0.9,
        "analysis.tracker_accel_um_s2": 50.0,
        "analysis.tracker_diffusion_um2_s": 2.0,
        "analysis.tracker_confirm_hits": 2,
        "analysis.tracker_confirm_window": 4,
        "analysis.tracker_max_misses": 7,
    }
    new = {k.replace("analysis.tracker_", "tracker."): v for k, v in old.items()}
    assert load_config(None, env={}, overrides=old) == load_config(None, env={}, overrides=new)
    assert load_config(None, env={}, overrides=new).tracker != C.TrackerSection()


@pytest.mark.parametrize("layer", ["file", "env", "override"])
def test_old_and_new_name_in_one_layer_is_an_error_naming_both(tmp_path: Path, layer: str) -> None:
    path, env, overrides = None, {}, {}
    if layer == "file":
        path = _write(tmp_path, "[analysis]\ntracker_max_misses = 4\n[tracker]\nmax_misses = 6\n")
        names = ("analysis.tracker_max_misses", "tracker.max_misses")
    elif layer == "env":
        env = {"FOCALTRACK_ANALYSIS_TRACKER_MAX_MISSES": "4", "FOCALTRACK_TRACKER_MAX_MISSES": "6"}
        names = ("FOCALTRACK_ANALYSIS_TRACKER_MAX_MISSES", "FOCALTRACK_TRACKER_MAX_MISSES")
    else:
        overrides = {"analysis.tracker_max_misses": 4, "tracker.max_misses": 6}
        names = ("analysis.tracker_max_misses", "tracker.max_misses")
    with pytest.raises(ConfigError) as e:
        load_config(path, env=env, overrides=overrides)
    assert all(n in str(e.value) for n in names)


def test_old_name_in_one_layer_and_new_in_another_follow_the_precedence(
    tmp_path: Path,
) -> None:
    p = _write(tmp_path, "[analysis]\ntracker_max_misses = 4\n")
    assert load_config(p, env={"FOCALTRACK_TRACKER_MAX_MISSES": "6"}).tracker.max_misses == 6
    p2 = _write(tmp_path, "[tracker]\nmax_misses = 4\n")
    env = {"FOCALTRACK_ANALYSIS_TRACKER_MAX_MISSES": "6"}
    assert load_config(p2, env=env).tracker.max_misses == 6


def test_schema_accepts_the_old_keys_as_deprecated() -> None:
    analysis = C.config_schema()["properties"]["analysis"]["properties"]
    for (section, old), (_, new) in C.RENAMED.items():
        assert section == "analysis"
        assert analysis[old]["deprecated"] is True and new in analysis[old]["description"]
