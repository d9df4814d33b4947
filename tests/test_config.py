from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from focaltrack.daemon import config as C
from focaltrack.daemon.config import ConfigError, ServiceConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "f.toml"
    p.write_text(text, "utf-8")
    return p


def test_defaults_without_file() -> None:
    cfg = load_config(None, env={})
    assert cfg == ServiceConfig()
    assert cfg.network.control_port == 5560 and cfg.network.bind == "127.0.0.1"
    assert cfg.sim.velocity_um_s == (75.0, 0.0, 0.0)
    assert cfg.driver.port == 4827


def test_precedence_cli_env_file_default(tmp_path: Path) -> None:
    p = _write(tmp_path, "[network]\ncontrol_port = 1111\npub_port = 2222\nmetrics_port = 3333\n")
    env = {"FOCALTRACK_NETWORK_CONTROL_PORT": "4444", "FOCALTRACK_NETWORK_PUB_PORT": "5555"}
    cfg = load_config(p, env=env, overrides={"network.control_port": 0, "network.bind": None})
    assert cfg.network.control_port == 0  # command line
    assert cfg.network.pub_port == 5555  # environment
    assert cfg.network.metrics_port == 3333  # file
    assert cfg.network.pub_hwm == 1000  # default
    assert cfg.network.bind == "127.0.0.1"  # None override = not given


def test_env_parsing_and_foreign_variables() -> None:
    env = {
        "FOCALTRACK_NETWORK_ALLOW_INSECURE_REMOTE": "yes",
        "FOCALTRACK_SIM_VELOCITY_UM_S": "[1, 2, 3]",
        "FOCALTRACK_SIM_Z_RANGE_UM": "-50,10",
        "FOCALTRACK_DRIVER_EXPOSURE_MS": "5",
        "FOCALTRACK_CACHE": "/somewhere",  # not a setting: ignored
        "OTHER": "x",
    }
    cfg = load_config(None, env=env)
    assert cfg.network.allow_insecure_remote is True
    assert cfg.sim.velocity_um_s == (1.0, 2.0, 3.0)
    assert cfg.sim.z_range_um == (-50.0, 10.0)
    assert cfg.driver.exposure_ms == 5.0 and isinstance(cfg.driver.exposure_ms, float)


def test_overrides_from_strings() -> None:
    cfg = load_config(
        None, env={}, overrides={"network.control_port": "0", "driver.attach": "true"}
    )
    assert cfg.network.control_port == 0 and cfg.driver.attach is True


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[network]\ncontrol_prot = 1\n", "network.control_prot"),
        ("[netwrok]\nbind = 'x'\n", "netwrok"),
        ("[network]\ncontrol_port = 'abc'\n", "network.control_port"),
        ("[network]\ncontrol_port = 70000\n", "network.control_port"),
        ("[driver]\nkind = 'andor'\n", "driver.kind"),
        ("[driver]\nattach = 1\n", "driver.attach"),
        ("[driver]\nexposure_ms = 0\n", "driver.exposure_ms"),
        ("[sim]\nvelocity_um_s = [1, 2]\n", "sim.velocity_um_s"),
        ("[sim]\nz_range_um = [0, -10]\n", "sim.z_range_um"),
        ("[sim]\nwidth = 10.5\n", "sim.width"),
        ("network = 3\n", "network"),
        ("[network]\ncontrol_port = 7000\npub_port = 7000\n", "network.pub_port"),
        ("not toml [\n", "not valid TOML"),
    ],
)
def test_file_errors_name_the_setting(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        load_config(_write(tmp_path, text), env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"FOCALTRACK_NETWORK_CONTROL_PROT": "1"}, "network.control_prot"),
        ({"FOCALTRACK_NETWORK_CONTROL_PORT": "x"}, "FOCALTRACK_NETWORK_CONTROL_PORT"),
        ({"FOCALTRACK_DRIVER_ATTACH": "maybe"}, "driver.attach"),
        ({"FOCALTRACK_SIM_VELOCITY_UM_S": "1,a,3"}, "sim.velocity_um_s"),
        ({"FOCALTRACK_ANALYSIS_QUEUE_FRAMES": "0"}, "analysis.queue_frames"),
    ],
)
def test_env_errors(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, env=env)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"network.nope": 1}, "network.nope"),
        ({"nosection.x": 1}, "nosection"),
        ({"network": 1}, "section.key"),
        ({"network.control_port": True}, "network.control_port"),
        ({"network.control_port": -1}, "network.control_port"),
        ({"train.preset": "fast"}, "train.preset"),
    ],
)
def test_override_errors(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, env={}, overrides=overrides)


def test_shipped_config_schema_is_current_and_valid() -> None:
    shipped = json.loads((REPO / "daemon" / "schemas" / "config.json").read_text("utf-8"))
    assert shipped == C.config_schema()
    jsonschema.Draft202012Validator.check_schema(shipped)


def test_example_toml_has_every_setting_at_default(tmp_path: Path) -> None:
    text = (REPO / "deploy" / "focaltrack.toml").read_text("utf-8")
    assert text == C.example_toml()
    data = C.tomllib.loads(text)
    assert data == ServiceConfig().as_dict()
    assert load_config(REPO / "deploy" / "focaltrack.toml", env={}) == ServiceConfig()


def test_exposure_rules(tmp_path: Path) -> None:
    net = load_config(None, env={}).network
    assert C.check_exposure(net) is None
    for host in ("localhost", "::1", "[::1]", "127.0.0.2"):
        assert C.is_loopback(host)
    remote = load_config(None, env={}, overrides={"network.bind": "0.0.0.0"}).network
    with pytest.raises(ConfigError, match=r"network\.allow_insecure_remote"):
        C.check_exposure(remote)
    insecure = load_config(
        None, env={}, overrides={"network.bind": "*", "network.allow_insecure_remote": True}
    ).network
    assert "INSECURE" in (C.check_exposure(insecure) or "")
    half = load_config(
        None,
        env={},
        overrides={"network.bind": "0.0.0.0", "network.curve_server_secret_file": "x"},
    ).network
    with pytest.raises(ConfigError, match="curve_allowed_clients_dir"):
        C.check_exposure(half)


def test_workspace_dir(tmp_path: Path) -> None:
    cfg = load_config(None, env={})
    assert C.workspace_dir(cfg, {"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "focaltrack"
    cfg2 = load_config(None, env={}, overrides={"workspace.dir": str(tmp_path / "ws")})
    assert C.workspace_dir(cfg2) == tmp_path / "ws"


# ----------------------------------------------------------------------------- workspace


def test_workspace_layout_names_and_state(tmp_path: Path) -> None:
    from focaltrack.daemon.workspace import NotFound, Workspace, WorkspaceError, WorkspaceState

    ws = Workspace(tmp_path / "ws")
    assert ws.calibrations_dir.is_dir() and ws.models_dir.is_dir() and ws.recordings_dir.is_dir()
    assert ws.read_state() == WorkspaceState()
    t = 1_795_251_012.0  # 2026-11-21 08:50:12 UTC
    name = ws.new_name("cal", now_s=t)
    assert name == "cal-20261121-085012"
    ws.calibration_path(name).write_bytes(b"not hdf5")
    assert ws.new_name("cal", now_s=t) == "cal-20261121-085012-2"
    for bad in ("../x", "a/b", ".hidden", "", "x.h5", "a" * 200):
        with pytest.raises(WorkspaceError):
            ws.calibration_path(bad)
    with pytest.raises(NotFound):
        ws.find_model("nope")
    # An incomplete bundle is not a model; a complete one is listed with its metadata.
    (ws.models_dir / "half").mkdir()
    good = ws.models_dir / "m1"
    good.mkdir()
    (good / "bundle.json").write_text(
        json.dumps(
            {
                "created_utc": "2026-11-21T08:00:00Z",
                "calibration": {"sha256": "ab"},
                "pixel_size_um": 0.65,
                "training": {"preset": "quick"},
            }
        )
    )
    (good / "COMPLETE").write_text("")
    models = ws.list_models()
    assert [m["name"] for m in models] == ["m1"]
    assert models[0]["calibration_sha256"] == "ab" and models[0]["preset"] == "quick"
    cals = ws.list_calibrations()
    assert [c["name"] for c in cals] == [name] and "error" in cals[0]
    ws.update_state(calibration=name, model="m1")
    assert Workspace(tmp_path / "ws").read_state() == WorkspaceState(name, "m1")
    assert not list(ws.root.glob(".state.*"))  # no temporary file left behind
    # A state naming files that are gone restores nothing; a corrupt one too.
    import shutil

    shutil.rmtree(good)
    assert ws.read_state() == WorkspaceState(name, None)
    ws.state_path.write_text("{corrupt")
    assert ws.read_state() == WorkspaceState()
