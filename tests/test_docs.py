"""The docs against the code they describe: docs/service.md's metrics table and queries
against the metrics the service registers, docs/protocol.md's C example against a C
compiler and libzmq's header (when this machine has them)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from focaltrack.daemon.metrics import ServiceMetrics
from focaltrack.daemon.protocol import State

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _section(page: str, title: str) -> str:
    text = (DOCS / page).read_text("utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _registered() -> dict[str, tuple[str, frozenset[str], frozenset[str]]]:
    """Exposed name -> (type, label names, label values) of the service's registry."""
    out = {}
    for fam in ServiceMetrics(states=[s.value for s in State]).registry.collect():
        name = fam.name + ("_total" if fam.type == "counter" else "")
        labels = {(k, v) for smp in fam.samples for k, v in smp.labels.items() if k != "le"}
        out[name] = (fam.type, frozenset(k for k, _ in labels), frozenset(v for _, v in labels))
    return out


def _documented() -> dict[str, tuple[str, frozenset[str], str]]:
    """Name -> (type, label names, meaning) of each row of service.md's metrics table."""
    out = {}
    for line in _section("service.md", "Metrics").splitlines():
        m = re.match(r"\| `(focaltrack_\w+)(?:\{([\w,]*)\})?` \| (\w+) \| (.*) \|$", line)
        if m:
            name, labels, kind, meaning = m.groups()
            assert name not in out, f"{name} twice in the table"
            out[name] = (kind, frozenset(filter(None, (labels or "").split(","))), meaning)
    return out


def test_metrics_table_is_exactly_the_registered_metrics() -> None:
    registered, documented = _registered(), _documented()
    assert sorted(documented) == sorted(registered)
    for name, (kind, labels, values) in registered.items():
        doc_kind, doc_labels, meaning = documented[name]
        assert (doc_kind, doc_labels) == (kind, labels), name
        for value in values:  # every label value the service creates, by name
            assert f"`{value}`" in meaning, f"{name}: label value {value} not in the docs"


def _labels_after(expr: str, registered: dict[str, tuple[str, frozenset[str], frozenset[str]]]):
    """The label names a PromQL side keeps: its metric's, less ``sum without(...)``, or just
    ``sum by(...)``, or none after a plain ``sum(``."""
    names = re.findall(r"focaltrack_\w+?(?=_bucket\b|\[|\{|\)|$)", expr)
    assert names, expr
    labels = set(registered[names[0]][1])
    if m := re.search(r"sum\s+without\s*\(([\w,\s]*)\)", expr):
        labels -= {x.strip() for x in m.group(1).split(",")}
    elif m := re.search(r"sum\s+by\s*\(([\w,\s]*)\)", expr):
        labels &= {x.strip() for x in m.group(1).split(",")}
    elif re.search(r"\bsum\s*\(", expr):
        labels = set()
    return labels


def test_metric_queries_divide_matching_label_sets() -> None:
    # Prometheus divides series with equal label sets only; dropped{reason} / acquired{}
    # returns no series at all, with no error to say why.
    registered = _registered()
    queries = re.findall(r"`([^`]*focaltrack_[^`]*)`", _section("service.md", "Metrics"))
    ratios = [q for q in (" ".join(q.split()) for q in queries) if " / " in q]
    assert ratios, "no ratio query found"
    for q in ratios:
        num, den = q.split(" / ")
        for m in re.findall(r"focaltrack_\w+", q):
            assert m.removesuffix("_bucket") in registered, f"{q}: unknown metric {m}"
        assert _labels_after(num, registered) == _labels_after(den, registered), q


def _zmq_header_available(cc: str) -> bool:
    r = subprocess.run(
        [cc, "-E", "-x", "c", "-"], input=b"#include <zmq.h>\n", capture_output=True, check=False
    )
    return r.returncode == 0


def test_c_example_compiles(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not _zmq_header_available(cc):
        pytest.skip("needs a C compiler and libzmq's header (libzmq3-dev)")
    src = _section("protocol.md", "8. Examples")
    code = re.search(r"```c\n(.*?)```", src, re.S)
    assert code is not None
    (tmp_path / "sub.c").write_text(code.group(1), "utf-8")
    r = subprocess.run(
        [cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", str(tmp_path / "sub.c")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
