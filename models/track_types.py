"""What the tracker returns: one `Track`, the tracks of one frame (`TrackFrame`), the tracks
of a whole recording (`TrackTable`).

`TrackFrame` and `TrackTable` hold the tracks stacked the way the filter works on them
(positions (T, 3), covariances (T, 3, 3)); their `record` flattens them into the
`focaltrack.records.Tracks` record, whose columns are what the wire and the files carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from focaltrack.records.tracks import Tracks, TrackStatus

__all__ = ["Track", "TrackFrame", "TrackTable"]


@dataclass(frozen=True, slots=True, eq=False)  # arrays: compare fields explicitly
class Track:
    """One live track after a frame. Arrays are read-only."""

    id: int
    t_s: float
    xyz_um: np.ndarray  # (3,)
    velocity_um_s: np.ndarray  # (3,); zeros under the random-walk model
    cov_xyz_um2: np.ndarray  # (3, 3) position covariance
    status: TrackStatus  # coasting: confirmed, but no localization this frame
    age_frames: int  # frames since birth, the birth frame counting as 1
    hits: int  # frames with an assigned localization
    misses: int  # consecutive frames without one (0 when updated this frame)
    localization_row: int  # row of this frame's input assigned to it, -1 if none


class _StatusRows:
    """The rows of a track column set by status (`TrackFrame`, `TrackTable`)."""

    __slots__ = ()
    status: np.ndarray  # uint8 `TrackStatus` codes

    @property
    def confirmed(self) -> np.ndarray:
        """Rows of confirmed tracks, coasting ones included (a client steers on status
        confirmed only: `TrackStatus`)."""
        return TrackStatus.is_confirmed(self.status)

    @property
    def coasting(self) -> np.ndarray:
        """Rows of confirmed tracks without a localization this frame (position predicted)."""
        ok: np.ndarray = self.status == TrackStatus.COASTING.code
        return ok


@dataclass(frozen=True, slots=True, eq=False)  # arrays: compare fields explicitly
class TrackFrame(_StatusRows):
    """The tracks alive after one frame, stacked as the filter holds them (row i is one
    track); `record` flattens them into the `Tracks` record that the wire and files carry."""

    t_s: float
    id: np.ndarray  # (T,) int64
    xyz_um: np.ndarray  # (T, 3)
    velocity_um_s: np.ndarray  # (T, 3)
    cov_xyz_um2: np.ndarray  # (T, 3, 3)
    status: np.ndarray  # (T,) uint8 `TrackStatus` codes
    age_frames: np.ndarray  # (T,) int64
    hits: np.ndarray  # (T,) int64
    misses: np.ndarray  # (T,) int64
    localization_row: np.ndarray  # (T,) int64: row of this frame's input, -1 if none

    def __len__(self) -> int:
        return len(self.id)

    def record(self, frame: int = -1) -> Tracks:
        """These tracks as the `Tracks` record, at camera frame ``frame``."""
        n = len(self)
        return _record(
            np.full(n, frame, dtype=np.int64),
            np.full(n, self.t_s),
            self.id,
            self.xyz_um,
            self.velocity_um_s,
            self.cov_xyz_um2,
            self.status,
            self.age_frames,
            self.hits,
            self.misses,
            self.localization_row,
        )

    def as_columns(self) -> dict[str, np.ndarray]:
        """The columns of `record` by name: what `track_header` and the recorder take."""
        return self.record().columns()

    def tracks(self) -> list[Track]:
        xyz = self.xyz_um
        vel = self.velocity_um_s
        cov = self.cov_xyz_um2
        out = []
        for i, (tid, code, age, hits, miss, row) in enumerate(
            zip(
                self.id.tolist(),
                self.status.tolist(),
                self.age_frames.tolist(),
                self.hits.tolist(),
                self.misses.tolist(),
                self.localization_row.tolist(),
                strict=True,
            )
        ):
            status = TrackStatus.of_code(code)
            out.append(Track(tid, self.t_s, xyz[i], vel[i], cov[i], status, age, hits, miss, row))
        return out


def _record(
    frame: np.ndarray,
    t_s: np.ndarray,
    ids: np.ndarray,
    xyz: np.ndarray,
    vel: np.ndarray,
    cov: np.ndarray,
    status: np.ndarray,
    age: np.ndarray,
    hits: np.ndarray,
    misses: np.ndarray,
    rows: np.ndarray,
) -> Tracks:
    sig = np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0.0))
    return Tracks(
        frame=frame,
        t_s=t_s,
        track_id=ids,
        x_um=xyz[:, 0],
        y_um=xyz[:, 1],
        z_um=xyz[:, 2],
        vx_um_s=vel[:, 0],
        vy_um_s=vel[:, 1],
        vz_um_s=vel[:, 2],
        sigma_x_um=sig[:, 0],
        sigma_y_um=sig[:, 1],
        sigma_z_um=sig[:, 2],
        status=status,
        age_frames=age,
        misses=misses,
        hits=hits,
        localization_row=rows,
    )


@dataclass(frozen=True, slots=True, eq=False)  # arrays: compare fields explicitly
class TrackTable(_StatusRows):
    """Tracks of a whole recording, stacked as `TrackFrame`: one row per live track per
    frame; `record` flattens them into the `Tracks` record the track files are made of."""

    frame: np.ndarray  # (n,) int64
    t_s: np.ndarray  # (n,)
    track_id: np.ndarray  # (n,) int64
    xyz_um: np.ndarray  # (n, 3)
    velocity_um_s: np.ndarray  # (n, 3)
    cov_xyz_um2: np.ndarray  # (n, 3, 3)
    status: np.ndarray  # (n,) uint8 `TrackStatus` codes
    age_frames: np.ndarray
    hits: np.ndarray
    misses: np.ndarray
    localization_row: np.ndarray  # (n,) int64: input row assigned this frame, -1 if none

    def __len__(self) -> int:
        return len(self.frame)

    def record(self) -> Tracks:
        return _record(
            self.frame,
            self.t_s,
            self.track_id,
            self.xyz_um,
            self.velocity_um_s,
            self.cov_xyz_um2,
            self.status,
            self.age_frames,
            self.hits,
            self.misses,
            self.localization_row,
        )

    def select(self, mask: np.ndarray) -> TrackTable:
        return TrackTable(*(getattr(self, f)[mask] for f in self.__slots__))

    def ever_confirmed(self) -> TrackTable:
        """Rows of tracks that were confirmed at some point (their tentative start included)."""
        good = np.unique(self.track_id[self.confirmed])
        return self.select(np.isin(self.track_id, good))

    @classmethod
    def from_frames(cls, parts: list[tuple[int, TrackFrame]]) -> TrackTable:
        """The rows of ``(frame number, TrackFrame)`` pairs, in order."""
        if not parts:
            return cls.empty()
        n = [len(p) for _, p in parts]
        return cls(
            np.repeat(np.array([f for f, _ in parts], dtype=np.int64), n),
            np.repeat(np.array([p.t_s for _, p in parts]), n),
            np.concatenate([p.id for _, p in parts]),
            np.concatenate([p.xyz_um for _, p in parts]).reshape(-1, 3),
            np.concatenate([p.velocity_um_s for _, p in parts]).reshape(-1, 3),
            np.concatenate([p.cov_xyz_um2 for _, p in parts]).reshape(-1, 3, 3),
            np.concatenate([p.status for _, p in parts]),
            np.concatenate([p.age_frames for _, p in parts]),
            np.concatenate([p.hits for _, p in parts]),
            np.concatenate([p.misses for _, p in parts]),
            np.concatenate([p.localization_row for _, p in parts]),
        )

    @classmethod
    def empty(cls) -> TrackTable:
        e = np.zeros(0, dtype=np.int64)
        z3 = np.zeros((0, 3))
        return cls(
            e, np.zeros(0), e, z3, z3, np.zeros((0, 3, 3)), np.zeros(0, np.uint8), e, e, e, e
        )
