"""`focaltrack show`: the figure of a recording, through the CLI, from recordings written by
the service's own `Recorder` (frames with emitters, localizations and tracks; without frames;
without tracks; still open), and the one-line errors of files that are not recordings."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from matplotlib.image import imread

from focaltrack.daemon.cli import main
from focaltrack.daemon.commands.show import draw_recording, read_recording_view
from focaltrack.daemon.recorder import Recorder
from focaltrack.drivers.base import Frame
from focaltrack.models.recording_figure import FIGURE_SIZE_IN
from focaltrack.records import STATUS_CODES, Tracks, hdf5_columns

H, W, PX = 48, 64, 0.5
#: Camera frames recorded: 0..21 but 10 and 11 (dropped by the camera, say).
FRAMES = [i for i in range(22) if i not in (10, 11)]
BUSY = 7  # the frame with four localizations, the others have three


def _emitters(i: int) -> np.ndarray:
    """(n, 3) positions in µm: two moving, one still, a fourth only in frame BUSY."""
    xyz = np.array([[4.0 + 1.0 * i, 6.0, 10.0], [20.0, 4.0 + 0.8 * i, 45.0], [12.0, 18.0, 80.0]])
    return np.vstack([xyz, [[27.0, 20.0, 60.0]]]) if i == BUSY else xyz


def _pixels(i: int, xyz: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W] * PX
    img = np.full((H, W), 100.0)
    for x, y, _ in xyz:
        img += 900.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 2.0)
    px = img.astype(np.uint16)
    px[-1, -1] = 2000 + i  # tells the frames apart
    return px


def _tracks(i: int, xyz: np.ndarray) -> dict[str, np.ndarray]:
    """Tracks 1–3 on the first three emitters, confirmed from frame 3 on; every HDF5
    column of the `Tracks` record filled (zeros where the figure does not look)."""
    n = 3
    spec = hdf5_columns(Tracks)
    cols = {k: np.zeros(n, dtype="u1" if dt == "enum" else dt) for k, dt in spec.items()}
    cols["track_id"] = np.arange(1, n + 1)
    for k, c in enumerate(("x_um", "y_um", "z_um")):
        cols[c] = xyz[:n, k] + 0.05
    cols["status"] = np.full(n, STATUS_CODES["confirmed" if i >= 3 else "tentative"], np.uint8)
    cols["age_frames"] = np.full(n, i + 1)
    return cols


def _record(path: Path, *, frames: bool = True, tracks: bool = True, stop: bool = True) -> Recorder:
    r = Recorder(path, frame_shape=(H, W), frames=frames, pixel_size_um=PX, model="m1",
                 flush_interval_s=0.05)  # fmt: skip
    r.start()
    for i in FRAMES:
        xyz = _emitters(i)
        assert r.add_frame(Frame(_pixels(i, xyz), i, 1000.0 + 0.1 * i, 0.0, 10.0))
        loc = {"x_um": xyz[:, 0], "y_um": xyz[:, 1], "z_um": xyz[:, 2],
               "score": np.full(len(xyz), 0.9)}  # fmt: skip
        assert r.add_results(i, loc, _tracks(i, xyz) if tracks else None)
    if stop:
        s = r.stop()
        assert s.error is None and s.frames == len(FRAMES)
    return r


def _crop(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    assert 0 <= left < right <= img.shape[1] and 0 <= top < bottom <= img.shape[0], box
    return img[top:bottom, left:right, :3]


def _coloured(rgb: np.ndarray) -> int:
    """Pixels that are clearly not grey (circles and lines drawn with a colour map)."""
    return int(np.sum(rgb.max(axis=2) - rgb.min(axis=2) > 0.25))


def test_show_draws_the_busiest_frame_the_tracks_and_the_counters(tmp_path, capsys):
    rec = tmp_path / "rec.h5"
    _record(rec)
    png = tmp_path / "out" / "rec.png"
    png.parent.mkdir()
    assert main(["show", str(rec), "--png", str(png)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the columns' padding aside
    img = imread(png)
    assert img.shape[:2] == (round(FIGURE_SIZE_IN[1] * 100), round(FIGURE_SIZE_IN[0] * 100))
    # the counters, printed as drawn: 20 frames of 0–21, two missing, nothing lost writing
    assert "20, 20 with pixels" in out and "0–21 (22)" in out
    assert (
        "missing (index gaps) 2 (camera or recorder drops)" in out
        and "recorder drops 0 (writer" in out
    )
    assert "analysed ≥ 20 (frames with results)" in out and "latency not in the file" in out
    assert "tracks 3 (3 confirmed), longest 20 frames" in out
    assert f"figure: {png}" in out

    view = read_recording_view(rec)
    assert view.image_frame == BUSY and view.image is not None
    assert view.image[-1, -1] == 2000 + BUSY  # the pixels of that frame
    assert view.frame_shape == (H, W) and view.pixel_size_um == PX
    np.testing.assert_array_equal(np.unique(view.tracks["track_id"]), [1, 2, 3])
    assert view.tracks["confirmed"].sum() == 3 * len([i for i in FRAMES if i >= 3])

    # the same figure, with where each panel landed
    fig = draw_recording(rec, tmp_path / "again.png")
    assert fig.size_px == (img.shape[1], img.shape[0]) and not fig.notes
    again = imread(fig.path)
    np.testing.assert_array_equal(again, img)  # deterministic: the CLI drew this very layout
    frame = _crop(img, fig.panels["frame"])
    grey = frame.mean(axis=2)
    assert grey.std() > 0.05  # an image, not a blank panel
    assert _coloured(frame) > 50  # the localizations' circles, coloured by depth
    assert _coloured(_crop(img, fig.panels["tracks_xy"])) > 50  # lines coloured by time
    assert _coloured(_crop(img, fig.panels["tracks_3d"])) > 50
    assert _coloured(_crop(img, fig.panels["longest"])) > 50

    # another frame on request; one the recording lacks is a one-line error
    assert read_recording_view(rec, frame=3).image[-1, -1] == 2003  # type: ignore[index]
    assert main(["show", str(rec), "--png", str(tmp_path / "x.png"), "--frame", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--frame 10: not in" in err and "0–21" in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()


def test_show_draws_a_recording_without_frames_or_tracks(tmp_path, capsys):
    rec = tmp_path / "meta.h5"
    _record(rec, frames=False, tracks=False)
    png = tmp_path / "meta.png"
    assert main(["show", str(rec), "--png", str(png)]) == 0
    assert "20, metadata only (no pixels)" in capsys.readouterr().out
    view = read_recording_view(rec)
    assert view.image is None and view.image_frame == BUSY
    fig = draw_recording(rec, png)
    assert fig.notes["frame"] == "recorded without frames: localizations only"
    assert fig.notes["tracks_xy"] == "no tracks in this recording"
    assert fig.notes["tracks_3d"] and fig.notes["longest"] == "no confirmed track"
    assert "counts" not in fig.notes  # the localizations per frame are still there
    img = imread(png)
    assert img.shape[:2] == (1000, 1600)
    assert _coloured(_crop(img, fig.panels["frame"])) > 50  # circles without a frame


def test_show_reads_a_recording_still_open(tmp_path):
    """A file whose writer has not closed it (a crash looks the same): read as SWMR, with
    the counters saying so."""
    rec = tmp_path / "open.h5"
    r = _record(rec, stop=False)
    try:
        view = read_recording_view(rec)
        rows = dict(view.counters[0][1])
        assert rows["file"].startswith("not closed cleanly")
        assert rows["recorder drops"] == "not stored (the file was not closed)"
        assert "NOT CLOSED CLEANLY" in view.title
        draw_recording(rec, tmp_path / "open.png")
    finally:
        r.stop()
    assert (tmp_path / "open.png").stat().st_size > 10_000


def test_show_refuses_what_is_not_a_recording(tmp_path, capsys):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5\n")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["frames"] = np.zeros((2, 4, 4), np.uint16)
    cases = {
        text: "not a focaltrack recording (not an HDF5 file)",
        other: "not a focaltrack recording (kind 'missing'",
        tmp_path / "absent.h5": "no such file",
    }
    for path, message in cases.items():
        png = tmp_path / f"{path.stem}.png"
        assert main(["show", str(path), "--png", str(png)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert err.startswith("focaltrack show: error:")
        assert not png.exists()
    rec = tmp_path / "rec.h5"
    _record(rec, tracks=False)
    assert main(["show", str(rec), "--png", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["show", str(rec), "--png", str(rec)]) == 2
    assert "would overwrite the recording" in capsys.readouterr().err
    assert read_recording_view(rec).image is not None  # untouched


def test_rows_past_the_writers_flushed_count_are_not_read(tmp_path):
    # HDF5 can show a live file's new rows before their values: zeros, which would be
    # localizations at (0, 0, 0) in frame 0. `show` and `track` read what `flushed` counts.
    from focaltrack.daemon.commands.track import read_recording

    rec = tmp_path / "rec.h5"
    _record(rec)
    before = read_recording_view(rec)
    table = read_recording(rec)
    with h5py.File(rec, "r+") as f:
        for group, extra in (("frame_meta", 2), ("localizations", 5), ("tracks", 4)):
            for name in f[group]:
                f[f"{group}/{name}"].resize(f[f"{group}/{name}"].shape[0] + extra, axis=0)
    after = read_recording_view(rec)
    assert after.counters == before.counters
    again = read_recording(rec)
    np.testing.assert_array_equal(again.frame, table.frame)
    np.testing.assert_array_equal(again.xyz_um, table.xyz_um)
