"""Calibration maths: curve, threshold choice, file round trip (with a fake encoder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caches.calibrate import (
    Calibration,
    calibrate,
    choose_threshold,
    load_pairs,
    load_threshold,
    plot_curve,
    precision_recall_curve,
)


def test_curve_counts_ties_together() -> None:
    sims = np.array([0.9, 0.8, 0.8, 0.5])
    labels = np.array([1, 1, 0, 1])
    th, p, r = precision_recall_curve(sims, labels)
    assert th.tolist() == [0.9, 0.8, 0.5]
    assert np.allclose(p, [1.0, 2 / 3, 3 / 4])
    assert np.allclose(r, [1 / 3, 2 / 3, 1.0])


def test_choose_threshold_lowest_that_reaches_target() -> None:
    sims = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6])
    labels = np.array([1, 1, 1, 0, 1, 0])
    t, p, r = choose_threshold(sims, labels, 1.0)
    assert (t, p, r) == (0.85, 1.0, 0.75)
    t, p, r = choose_threshold(sims, labels, 0.8)
    assert t == 0.7 and p == 0.8 and r == 1.0


def test_choose_threshold_unreachable_means_no_hits() -> None:
    sims = np.array([0.9, 0.5])
    labels = np.array([0, 1])
    t, p, r = choose_threshold(sims, labels, 0.99)
    assert t > 0.9 and r == 0.0


def test_load_pairs_ignores_other_columns(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text("id,text_a,text_b,label,extra\n1,a,b,1,x\n2,c,d,0,y\n3,e,f,,z\n")
    a, b, y = load_pairs([f])
    assert a == ["a", "c"] and b == ["b", "d"] and y.tolist() == [1, 0]


def test_calibrate_end_to_end_with_fake_encoder(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    rows = ["text_a,text_b,label", "x1,x2,1", "y1,y2,1", "z1,z2,0", "w1,w2,0"]
    f.write_text("\n".join(rows) + "\n")
    basis = {"x": [1, 0], "y": [0, 1], "z": [1, 1], "w": [1, -1]}

    def fake_encode(texts: list[str]) -> np.ndarray:
        # pair x: cos 1, pair y: cos 1, pair z: cos ~0.8, pair w: cos ~0.2
        out = []
        for t in texts:
            v = np.array(basis[t[0]], dtype=np.float32)
            if t.endswith("2"):
                v = v + {"x": 0, "y": 0, "z": np.array([0.0, -0.6]), "w": np.array([0.0, 1.2])}[t[0]]
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)

    result, sims, labels = calibrate([f], 0.99, encode_fn=fake_encode, guard=False)
    assert result.precision == 1.0 and result.recall == 1.0
    assert result.threshold > sims[labels == 0].max()
    out = tmp_path / "cal.json"
    out.write_text(result.model_dump_json())
    assert load_threshold(out) == result.threshold
    png = tmp_path / "cal.png"
    plot_curve(sims, labels, result, png)
    assert png.stat().st_size > 1000


def test_shipped_calibration_is_valid() -> None:
    path = Path(__file__).resolve().parents[2] / "configs" / "semantic_calibration.json"
    cal = Calibration.model_validate_json(path.read_text())
    assert 0.5 < cal.threshold < 1.0
    assert cal.precision >= cal.target_precision
    assert path.with_suffix(".png").exists()
