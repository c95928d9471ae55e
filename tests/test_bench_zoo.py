"""The zoo benchmarks run against today's zoo API on the test zoo, and measure what they claim: on the
control pair TransFusion's permutation is the zoo's hidden shuffle on every unit, and undoing that shuffle
reproduces the source's fine-tune exactly."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def control(tiny_zoo):
    from bench import zoo_transfusion

    return zoo_transfusion.run(str(tiny_zoo), ["control"], None, None, calibration=16, progress=False)


def test_zoo_transfusion_finds_the_hidden_shuffle_on_the_control_pair(control):
    _, quality = control
    weight = [q for q in quality if q["matching"] == "weight"]
    assert weight and all(q[k] == 1.0 for q in weight for k in ("residual", "heads", "within-head", "mlp"))


def test_zoo_transfusion_at_alpha_one_is_the_source_fine_tune_relabelled(control):
    rows, _ = control
    assert rows and all(r["tf_weight_at_1"] == r["hidden_shuffle"] == r["source_finetuned"] for r in rows)
