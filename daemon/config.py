"""Service settings: defaults < TOML file < environment < command line.

Every setting lives in one section of :class:`ServiceConfig` (``driver``, ``sim``, ``network``,
``workspace``, ``analysis``, ``tracker``, ``recording``, ``train``, ``log``) and has a default, so
an empty or missing file is a valid configuration. ``[tracker]`` is generated from
`focaltrack.models.tracker_config.TrackerConfig` (same names, defaults and help), and its values
are checked by ``TrackerConfig`` itself. :func:`load_config` merges, in increasing precedence:

1. the defaults declared below;
2. the TOML file (validated against :func:`config_schema`, a JSON Schema with
   ``additionalProperties: false`` at every level, so a misspelt key is an error naming it);
3. environment variables ``FOCALTRACK_<SECTION>_<KEY>``
   (e.g. ``FOCALTRACK_NETWORK_CONTROL_PORT=0``);
   only variables whose ``<SECTION>`` is one of ours are read (``FOCALTRACK_CACHE`` is not a
   setting), and an unknown key in a known section is an error;
4. ``overrides`` from the command line: ``{"network.control_port": 0, ...}``; ``None`` means
   "not given" and is skipped.

Strings from the environment or the command line are parsed by the setting's type: booleans
``true/false/1/0/yes/no/on/off``, numbers, lists as a JSON array or comma-separated numbers.
Every bad value raises :class:`ConfigError` naming the setting and where it came from.

Renamed settings (`RENAMED`: ``analysis.tracker_motion`` is now ``tracker.motion``, ...) are
still read under their old names, in every layer (``FOCALTRACK_ANALYSIS_TRACKER_MOTION``
too), with a logged warning; one layer that gives both names is an error naming both.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import math
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from focaltrack.common.errors import FocaltrackError
from focaltrack.models.tracker_config import (
    NOISE_FROM_MODEL,
    NOISE_SETTINGS,
    TrackerConfig,
    TrackerConfigError,
)

log = logging.getLogger("focaltrack.config")

ENV_PREFIX = "FOCALTRACK_"


class ConfigError(FocaltrackError, ValueError):
    """A setting is unknown, of the wrong type, out of range, or unsafe."""


def _s(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A setting: its default, one-line help and its constraints (kept as field metadata)."""
    meta = {
        "help": help,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "choices": choices,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class DriverConfig:
    kind: str = _s(
        "sim", "which microscope: the simulator or Micro-Manager", choices=("sim", "micromanager")
    )
    mm_app_path: str = _s(
        "", "Micro-Manager installation folder (headless MMCore via pycromanager)"
    )
    mm_config: str = _s("", "Micro-Manager hardware configuration file (.cfg)")
    attach: bool = _s(
        False, "attach to a running Micro-Manager's ZMQ server instead of starting MMCore"
    )
    port: int = _s(
        4827, "pycromanager bridge port (it also uses the ports after it)", minimum=1, maximum=65535
    )
    pixel_size_um: float = _s(
        0.0, "sample-space pixel size, µm; 0 = as reported by the core", minimum=0
    )
    exposure_ms: float = _s(10.0, "camera exposure, ms", exclusive_minimum=0)
    interval_ms: float = _s(
        0.0, "frame interval while live, ms; 0 = as fast as the camera runs", minimum=0
    )
    stage_timeout_s: float = _s(5.0, "longest wait for a focus move, s", exclusive_minimum=0)
    frame_timeout_s: float = _s(
        2.0, "longest wait for a frame before a camera fault, s", exclusive_minimum=0
    )


@dataclass(frozen=True, slots=True)
class SimConfig:
    width: int = _s(512, "simulated camera width, pixels", minimum=16, maximum=8192)
    height: int = _s(512, "simulated camera height, pixels", minimum=16, maximum=8192)
    n_emitters: int = _s(20, "emitters in the simulated sample", minimum=0, maximum=100000)
    motion: str = _s("flow", "emitter motion", choices=("static", "brownian", "flow"))
    velocity_um_s: tuple[float, ...] = _s((75.0, 0.0, 0.0), "flow velocity (vx, vy, vz), µm/s")
    diffusion_um2_s: float = _s(1.0, "diffusion coefficient per axis, µm²/s", minimum=0)
    z_range_um: tuple[float, ...] = _s(
        (-100.0, 0.0), "absolute z range of the emitters (lo, hi), µm; focus at 0 -> defocus 0..100"
    )
    seed: int = _s(0, "random seed of the simulated sample", minimum=0)


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    bind: str = _s("127.0.0.1", "address the control, publish and metrics sockets bind to")
    control_port: int = _s(5560, "control ROUTER port; 0 = any free port", minimum=0, maximum=65535)
    pub_port: int = _s(5561, "publish (PUB) port; 0 = any free port", minimum=0, maximum=65535)
    metrics_port: int = _s(
        9464, "Prometheus HTTP port; 0 = any free port", minimum=0, maximum=65535
    )
    curve_server_secret_file: str = _s("", "CURVE server secret key file (zmq.auth .key_secret)")
    curve_allowed_clients_dir: str = _s("", "folder of allowed clients' CURVE public keys (.key)")
    allow_insecure_remote: bool = _s(
        False, "allow a non-loopback bind without CURVE (logged loudly)"
    )
    pub_hwm: int = _s(1000, "PUB send high-water mark, messages per subscriber", minimum=1)


@dataclass(frozen=True, slots=True)
class WorkspaceConfig:
    dir: str = _s("", "workspace folder; empty = the per-user data folder")


@dataclass(frozen=True, slots=True)
class AnalysisConfig:
    queue_frames: int = _s(2, "frames waiting for analysis before the oldest is dropped", minimum=1)
    device: str = _s("", "torch device for inference (cpu, cuda, cuda:1); empty = automatic")
    threads: int = _s(0, "CPU threads for inference; 0 = automatic", minimum=0)
    # Both default to the model's own setting (its bundle's ``decode`` block), which is also
    # what `focaltrack localize` and `focaltrack evaluate` run without options: one analysis,
    # live and offline, unless a setting here says otherwise.
    passes: int = _s(
        0,
        "localizer passes live: 0 = the model's setting (what localize runs by default); "
        "1 = the networks alone; 2 = also fit, subtract and search the residual (finds "
        "crowded emitters)",
        minimum=0,
        maximum=4,
    )
    fit: str = _s(
        "model",
        "last localizer step live: model = the model's setting (what localize runs by "
        "default); spline = Poisson maximum-likelihood fit of the calibration (positions "
        "at the photons' precision, each with its sigma, photons and flags); none = the "
        "networks' positions (fast, no sigma)",
        choices=("model", "spline", "none"),
    )


def _tracker_section() -> type[Any]:
    """``[tracker]``: one setting per `TrackerConfig` field, with its name, default and help.

    The measurement noise defaults to `NOISE_FROM_MODEL` (0) instead: the live tracker takes
    it from the loaded model's validation unless the file says otherwise. Values are not
    range-checked here: `load_config` builds a `TrackerConfig` from them, which checks.
    """
    specs: list[tuple[str, type, Any]] = []
    for f in dataclasses.fields(TrackerConfig):
        default: Any = f.default
        help = f.metadata["help"]
        choices = None
        if isinstance(default, Enum):  # TOML and the environment spell it by its value
            choices = tuple(m.value for m in type(default))
            default = default.value
        if f.name in NOISE_SETTINGS:
            help += f"; 0 = from the model's validation ({default:g} if it has none)"
            default = NOISE_FROM_MODEL
        specs.append((f.name, type(default), _s(default, help, choices=choices)))
    cls = dataclasses.make_dataclass("TrackerSection", specs, frozen=True, slots=True)
    cls.__module__ = __name__  # make_dataclass (3.11) leaves it unset; repr and pickle need it
    return cls


#: The ``[tracker]`` section's class, generated from `TrackerConfig`'s fields.
TrackerSection = _tracker_section()


def tracker_settings(section: Any) -> dict[str, Any]:
    """A ``[tracker]`` section as the settings `TrackerConfig.from_settings` takes."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


@dataclass(frozen=True, slots=True)
class RecordingConfig:
    flush_interval_s: float = _s(
        1.0, "flush the HDF5 file at least this often, s", exclusive_minimum=0
    )
    queue_frames: int = _s(
        64, "frames waiting for the writer before new ones are dropped", minimum=1
    )


@dataclass(frozen=True, slots=True)
class TrainConfig:
    preset: str = _s("quick", "default training preset", choices=("quick", "default"))
    seed: int = _s(0, "default training seed", minimum=0)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = _s("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    driver: DriverConfig = field(default_factory=DriverConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    workspace: WorkspaceConfig = field(default_factory=WorkspaceConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    # Any: the class is generated (`TrackerSection`), so a type checker cannot see its
    # fields; read it with `tracker_settings`.
    tracker: Any = field(default_factory=TrackerSection)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON-able nested dict (tuples as lists)."""
        out: dict[str, dict[str, Any]] = {}
        for sec in dataclasses.fields(self):
            values = getattr(self, sec.name)
            out[sec.name] = {
                f.name: list(v) if isinstance(v := getattr(values, f.name), tuple) else v
                for f in dataclasses.fields(values)
            }
        return out


#: section name -> its dataclass, in file order.
SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(ServiceConfig)}  # type: ignore[misc]

#: Fixed lengths of the list-valued settings.
_LENGTHS = {("sim", "velocity_um_s"): 3, ("sim", "z_range_um"): 2}

#: Settings that moved: old (section, key) -> new. The old names are still read, with a
#: warning (``[tracker]`` was ``[analysis] tracker_*`` before it had a section).
RENAMED: dict[tuple[str, str], tuple[str, str]] = {
    ("analysis", f"tracker_{name}"): ("tracker", name)
    for name in (
        "motion",
        "sigma_lateral_um",
        "sigma_axial_um",
        "accel_um_s2",
        "diffusion_um2_s",
        "confirm_hits",
        "confirm_window",
        "max_misses",
    )
}

#: One layer of settings: (section, key) -> (value, the key as the layer spelled it).
_Layer = dict[tuple[str, str], tuple[Any, str]]


def _fields(section: str) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _kind(f: dataclasses.Field[Any]) -> type:
    return type(f.default)


# ----------------------------------------------------------------------------- schema


def _setting_schema(section: str, name: str) -> dict[str, Any]:
    f = _fields(section)[name]
    kind = _kind(f)
    s: dict[str, Any] = {"description": f.metadata["help"]}
    if kind is bool:
        s["type"] = "boolean"
    elif kind is int:
        s["type"] = "integer"
    elif kind is float:
        s["type"] = "number"
    elif kind is str:
        s["type"] = "string"
    elif kind is tuple:
        n = _LENGTHS[(section, name)]
        s.update(type="array", items={"type": "number"}, minItems=n, maxItems=n)
    m = f.metadata
    if m["minimum"] is not None:
        s["minimum"] = m["minimum"]
    if m["maximum"] is not None:
        s["maximum"] = m["maximum"]
    if m["exclusive_minimum"] is not None:
        s["exclusiveMinimum"] = m["exclusive_minimum"]
    if m["choices"] is not None:
        s["enum"] = list(m["choices"])
    default: Any = f.default
    s["default"] = list(default) if kind is tuple else default
    return s


def config_schema() -> dict[str, Any]:
    """The JSON Schema (Draft 2020-12) a TOML config file must satisfy."""
    props: dict[str, Any] = {}
    for section in SECTIONS:
        sec_props = {name: _setting_schema(section, name) for name in _fields(section)}
        props[section] = {"type": "object", "additionalProperties": False, "properties": sec_props}
    for (old_section, old_name), (section, name) in RENAMED.items():
        s = _setting_schema(section, name)
        del s["default"]
        s["description"] = f"deprecated: now [{section}] {name}"
        s["deprecated"] = True
        props[old_section]["properties"][old_name] = s
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://focaltrack.invalid/schemas/config.json",
        "title": "focaltrack service configuration (TOML)",
        "type": "object",
        "additionalProperties": False,
        "properties": props,
    }


# ----------------------------------------------------------------------------- values


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_text(section: str, name: str, text: str, where: str) -> Any:
    """A string from the environment or the command line, parsed by the setting's type."""
    f = _fields(section)[name]
    kind = _kind(f)
    t = text.strip()
    try:
        if kind is str:
            return text
        if kind is bool:
            if t.lower() in _TRUE:
                return True
            if t.lower() in _FALSE:
                return False
            raise ValueError
        if kind is int:
            return int(t)
        if kind is float:
            return float(t)
        if kind is tuple:
            if t.startswith("["):
                v = json.loads(t)
            else:
                v = [float(p) for p in t.split(",")]
            return v
    except (ValueError, json.JSONDecodeError):
        pass
    what = {bool: "true or false", int: "an integer", float: "a number", tuple: "a list of numbers"}
    raise ConfigError(f"{section}.{name} {where}: expected {what[kind]}, got {text!r}")


def _check(section: str, name: str, value: Any, where: str) -> Any:
    """Type- and range-check one value; return it normalised (int->float, list->tuple)."""
    f = _fields(section)[name]
    kind = _kind(f)
    key = f"{section}.{name}"
    m = f.metadata

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{key} {where}: {msg}")

    if kind is bool:
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise bad(f"expected a string, got {value!r}")
        if m["choices"] is not None and value not in m["choices"]:
            raise bad(f"must be one of {', '.join(m['choices'])}; got {value!r}")
        return value
    if kind is tuple:
        n = _LENGTHS[(section, name)]
        if not isinstance(value, list | tuple) or len(value) != n:
            raise bad(f"expected a list of {n} numbers, got {value!r}")
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise bad(f"expected a list of {n} finite numbers, got {value!r}")
            out.append(float(v))
        return tuple(out)
    # numbers
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise bad(f"expected an integer, got {value!r}")
            value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise bad(f"must be finite, got {value!r}")
    if m["minimum"] is not None and value < m["minimum"]:
        raise bad(f"must be ≥ {m['minimum']}, got {value!r}")
    if m["maximum"] is not None and value > m["maximum"]:
        raise bad(f"must be ≤ {m['maximum']}, got {value!r}")
    if m["exclusive_minimum"] is not None and value <= m["exclusive_minimum"]:
        raise bad(f"must be > {m['exclusive_minimum']}, got {value!r}")
    return value


def _known(section: str, name: str, where: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown section [{section}] {where} (known: {', '.join(SECTIONS)})")
    if name not in _fields(section):
        raise ConfigError(
            f"unknown setting {section}.{name} {where} "
            f"(known in [{section}]: {', '.join(_fields(section))})"
        )


def _canonical(section: str, name: str, where: str) -> tuple[str, str]:
    """The current name of a setting (a renamed one is logged); unknown names are errors."""
    new = RENAMED.get((section, name))
    if new is None:
        _known(section, name, where)
        return section, name
    log.warning(
        "%s.%s %s is deprecated: it is now %s.%s (section [%s], key %s)",
        section,
        name,
        where,
        *new,
        *new,
    )
    return new


def _add(layer: _Layer, key: tuple[str, str], value: Any, spelled: str, where: str) -> None:
    """Put one setting in ``layer``; the same setting under its old and new name is an error."""
    if key in layer:
        first = layer[key][1]
        raise ConfigError(
            f"{first} and {spelled} {where} are the same setting, {key[0]}.{key[1]}: "
            "give it once, by its new name"
        )
    layer[key] = (value, spelled)


def _file_layer(path: Path) -> _Layer:
    where = f"in {path}"
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    # Unknown names first, with the friendliest message; then the schema for the rest.
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] {where} (known: {', '.join(SECTIONS)})")
        if not isinstance(body, dict):
            raise ConfigError(f"[{section}] {where} must be a table, got {body!r}")
        for name in body:
            if (section, name) not in RENAMED:
                _known(section, name, where)
    import jsonschema  # only when a file is read

    validator = jsonschema.Draft202012Validator(config_schema())
    err = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if err is not None:
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ConfigError(f"{key} {where}: {err.message}")
    out: _Layer = {}
    for section, body in data.items():
        for name, value in body.items():
            _add(out, _canonical(section, name, where), value, f"{section}.{name}", where)
    return out


def _env_layer(env: Mapping[str, str]) -> _Layer:
    out: _Layer = {}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue  # e.g. FOCALTRACK_CACHE: not a service setting
        name = rest[len(section) + 1 :]
        where = f"from environment variable {var}"
        section, name = _canonical(section, name, where)
        value = _parse_text(section, name, text, where)
        _add(out, (section, name), value, var, "in the environment")
    return out


def _override_layer(overrides: Mapping[str, object]) -> _Layer:
    out: _Layer = {}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        where = "on the command line"
        if not name:
            raise ConfigError(f"override {key!r} {where} must look like section.key")
        section, name = _canonical(section, name, where)
        if isinstance(value, str) and _kind(_fields(section)[name]) is not str:
            value = _parse_text(section, name, value, where)
        _add(out, (section, name), value, key, where)
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> ServiceConfig:
    """Merge defaults < ``path`` (TOML) < ``env`` (default ``os.environ``) < ``overrides``.

    ``overrides`` keys are ``"section.key"``; ``None`` values are skipped. Raises
    :class:`ConfigError` naming the setting and its source on any problem.
    """
    layers: list[tuple[str, _Layer]] = []
    if path is not None and str(path) != "":
        layers.append((f"in {path}", _file_layer(Path(path))))
    layers.append(("from the environment", _env_layer(os.environ if env is None else env)))
    layers.append(("on the command line", _override_layer(overrides or {})))

    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    # (section, key) -> where its value came from, as the user spelled it.
    sources: dict[tuple[str, str], str] = {}
    for where, layer in layers:
        for (section, name), (value, spelled) in layer.items():
            values[section][name] = _check(section, name, value, where)
            sources[(section, name)] = f"{spelled} {where}"
    cfg = ServiceConfig(**{s: SECTIONS[s](**values[s]) for s in SECTIONS})
    _check_combined(cfg)
    _check_tracker(cfg, sources)
    return cfg


def _check_tracker(cfg: ServiceConfig, sources: Mapping[tuple[str, str], str]) -> None:
    """The tracker's own checks (`TrackerConfig`), as errors naming the settings' sources.

    The noise left to the model is checked at its default; the model's is checked when a
    model is loaded."""
    try:
        TrackerConfig.from_settings(tracker_settings(cfg.tracker))
    except TrackerConfigError as e:
        at = " and ".join(
            sources.get(("tracker", name), f"tracker.{name} (default)") for name in e.names
        )
        raise ConfigError(f"{at}: {e}") from None


def _check_combined(cfg: ServiceConfig) -> None:
    lo, hi = cfg.sim.z_range_um
    if not lo < hi:
        raise ConfigError(f"sim.z_range_um: lo must be < hi, got {list(cfg.sim.z_range_um)}")
    net = cfg.network
    ports = {
        "control_port": net.control_port,
        "pub_port": net.pub_port,
        "metrics_port": net.metrics_port,
    }
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port == 0:
            continue
        if port in seen:
            raise ConfigError(f"network.{name} and network.{seen[port]} are both {port}")
        seen[port] = name
    if not net.bind.strip():
        raise ConfigError("network.bind must not be empty (use 127.0.0.1 for loopback)")


# ----------------------------------------------------------------------------- helpers


def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``127.x.x.x`` and ``::1`` (with or without brackets)."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_exposure(net: NetworkConfig) -> str | None:
    """Refuse an unsafe bind; return a loud warning text when the insecure opt-out is used.

    A non-loopback ``network.bind`` needs ``curve_server_secret_file`` and
    ``curve_allowed_clients_dir`` (both existing), unless ``allow_insecure_remote`` is true.
    """
    curve = bool(net.curve_server_secret_file or net.curve_allowed_clients_dir)
    if curve:
        if not net.curve_server_secret_file or not net.curve_allowed_clients_dir:
            raise ConfigError(
                "CURVE needs both network.curve_server_secret_file and "
                "network.curve_allowed_clients_dir"
            )
        if not Path(net.curve_server_secret_file).is_file():
            raise ConfigError(
                f"network.curve_server_secret_file: {net.curve_server_secret_file} is not a file"
            )
        if not Path(net.curve_allowed_clients_dir).is_dir():
            raise ConfigError(
                "network.curve_allowed_clients_dir: "
                f"{net.curve_allowed_clients_dir} is not a folder"
            )
        return None
    if is_loopback(net.bind):
        return None
    if not net.allow_insecure_remote:
        raise ConfigError(
            f"network.bind = {net.bind!r} is not a loopback address: set "
            "network.curve_server_secret_file and network.curve_allowed_clients_dir, or "
            "network.allow_insecure_remote = true to accept anyone on the network"
        )
    return (
        f"INSECURE: control and data sockets bound to {net.bind} without CURVE "
        "(network.allow_insecure_remote = true): anyone who can reach this host can move the "
        "stage and read the data"
    )


def default_workspace_dir(env: Mapping[str, str] | None = None) -> Path:
    """The per-user data folder: ``$XDG_DATA_HOME/focaltrack``, ``~/.local/share/focaltrack``,
    or ``%LOCALAPPDATA%\\focaltrack`` on Windows."""
    env = os.environ if env is None else env
    if sys.platform == "win32":
        base = env.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "focaltrack"
    xdg = env.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg) / "focaltrack"
    return Path.home() / ".local" / "share" / "focaltrack"


def workspace_dir(cfg: ServiceConfig, env: Mapping[str, str] | None = None) -> Path:
    """``workspace.dir`` when set (``~`` expanded), else :func:`default_workspace_dir`."""
    if cfg.workspace.dir:
        return Path(cfg.workspace.dir).expanduser()
    return default_workspace_dir(env)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


_SECTION_NOTES = {
    "driver": "The microscope. `focaltrack serve --driver sim|micromanager` overrides kind.",
    "sim": 'The simulated microscope (driver.kind = "sim"): camera size and a moving sample.',
    "network": (
        'Sockets. Loopback by default; a non-loopback bind (e.g. "0.0.0.0") needs both CURVE\n'
        "# settings (server secret key + folder of allowed client public keys), or\n"
        "# allow_insecure_remote = true, which is logged as a warning. Port 0 = any free port\n"
        "# (the bound ports are logged and reported by `focaltrack status`). See docs/protocol.md."
    ),
    "workspace": (
        "Calibrations, models, recordings and state.json. Empty = $XDG_DATA_HOME/focaltrack,\n"
        "# ~/.local/share/focaltrack, or %LOCALAPPDATA%\\focaltrack on Windows."
    ),
    "analysis": "Live analysis: inference.",
    "tracker": (
        "The live tracker (docs/tracking.md): `TrackerConfig`'s parameters, same names and\n"
        "# defaults, also the options of `focaltrack track`. These were [analysis] tracker_*\n"
        "# (tracker_motion, ...): those keys still work, with a warning."
    ),
    "recording": "HDF5 recording (record_start / record_stop).",
    "train": "Defaults of the train command.",
    "log": "Logging to stderr.",
}


def example_toml() -> str:
    """A config file with every setting at its default and a comment (deploy/focaltrack.toml)."""
    lines = [
        "# focaltrack service configuration (`focaltrack serve --config focaltrack.toml`).",
        "# Every setting is shown at its default; delete what you do not change.",
        "# Precedence: command line > environment FOCALTRACK_<SECTION>_<KEY> > this file",
        "# > default.",
        "# Unknown keys are an error. Units are in the names (_um µm, _ms, _s seconds).",
    ]
    for section in SECTIONS:
        lines += ["", f"# {_SECTION_NOTES[section]}", f"[{section}]"]
        for name, f in _fields(section).items():
            m = f.metadata
            note = m["help"]
            if m["choices"]:
                note += f" ({' | '.join(m['choices'])})"
            lines.append(f"# {note}")
            lines.append(f"{name} = {_toml_value(f.default)}")
    return "\n".join(lines) + "\n"
