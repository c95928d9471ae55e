"""The regime measurements of bench.zoo_regime on the test zoo: each quantity is checked where its value is known."""
from __future__ import annotations

import pytest

from bench.zoo_regime import layer_rel_norms, linearisation, loss_along, rel_norm, vote_agreement
from transport.core.task_vector import TaskVector
from transport.data import digits_task
from transport.methods import TransportInputs, gradfix, no_progress
from transport.sources import load_zoo_model


@pytest.fixture(scope="module")
def pair(tiny_zoo):
    A, A_ft = load_zoo_model("A"), load_zoo_model("A+rot90")
    B, B_ft = load_zoo_model("B_indep"), load_zoo_model("B_indep+rot90")
    task = digits_task("rot90")
    tau = TaskVector.from_models(A.params, A_ft.params, A.arch)
    tau_b = TaskVector.from_models(B.params, B_ft.params, B.arch)
    return A, B, task, tau, tau_b


def test_relative_norms_add_up_over_layers(pair):
    A, _, _, tau, _ = pair
    per_layer = layer_rel_norms(tau, A.params)
    assert set(per_layer) == {-1, 0, 1}
    den = {l: 0.0 for l in per_layer}
    from transport.core.layout import param_axes

    for k in tau.keys():
        den[param_axes(A.arch)[k].layer] += float((A.params[k].double() ** 2).sum())
    total = sum(per_layer[l] ** 2 * den[l] for l in per_layer) / sum(den.values())
    assert rel_norm(tau, A.params) == pytest.approx(total ** 0.5, rel=1e-9)
    assert rel_norm(tau * 2.0, A.params) == pytest.approx(2 * rel_norm(tau, A.params), rel=1e-9)


def test_linearisation_is_exact_for_a_vanishing_step_and_not_for_the_zoo_tau(pair):
    A, _, task, tau, _ = pair
    small = linearisation(A, tau * 1e-3, task)
    assert small["taylor_rel_error"] < 0.02  # first order: the error is O(step)
    assert small["acc_linear"] == pytest.approx(small["acc_finetuned"], abs=3e-3)
    full = linearisation(A, tau, task)
    assert full["taylor_rel_error"] > 10 * small["taylor_rel_error"]


def test_vote_agreement_is_one_for_the_vote_itself_and_zero_for_its_opposite(pair):
    A, B, task, tau, tau_b = pair
    al = gradfix.prepare(TransportInputs(A, B, task, 2, 0), {}, no_progress)
    like_vote = TaskVector(B.arch, {k: (al.sign(k).double() * (1 + tau_b[k].abs().double())).float()
                                    if k in al.counts else tau_b[k] for k in tau_b.keys()})
    assert vote_agreement(al, like_vote) == {"plain": 1.0, "weighted": 1.0}
    assert vote_agreement(al, like_vote * -1.0) == {"plain": 0.0, "weighted": 0.0}
    real = vote_agreement(al, tau_b)
    assert 0.5 < real["plain"] < 1.0


def test_loss_along_the_masked_tau_starts_downhill_as_first_order_says(pair):
    A, B, task, tau, _ = pair
    al = gradfix.prepare(TransportInputs(A, B, task, 2, 0), {"vote": "mean"}, no_progress)
    delta = gradfix.apply(al, tau, 1.0, {"vote": "mean"})
    fo = al.last["first_order_total"]
    rows = loss_along(B, delta, task, task.shots(2, 0), fo, alphas=(1e-3, 0.5))
    assert fo < 0 and rows[0]["first_order"] == pytest.approx(1e-3 * fo)
    # the mean vote over the same shots: a small step lowers their loss by about alpha <g, delta>
    assert rows[0]["shots"] < 0 and rows[0]["shots"] == pytest.approx(rows[0]["first_order"], rel=0.2)
    assert rows[1]["logit_norm"] > 0


def test_ordering_note_appears_exactly_when_the_ordering_fails_and_names_the_measured_share():
    from transport.zoo import ordering

    held = {"naive": 0.30, "few-shot FT": 0.40, "GradFix": 0.50, "oracle mask": 0.80, "K": 2}
    assert ordering.ordered(held) and ordering.note(held, 0.734) is None
    tie = {**held, "GradFix": 0.40}  # strict: a tie with few-shot fine-tuning is not above it
    assert not ordering.ordered(tie) and ordering.failures(tie) == [("few-shot FT", "GradFix")]
    assert "GradFix 40.0% is not above" in ordering.note(tie, 0.5)
    lost = {**held, "GradFix": 0.333, "few-shot FT": 0.554}
    said = ordering.note(lost, 0.6049)
    assert said is not None and said.count(". ") == 0 and said.endswith(".")  # one sentence
    assert "on only 60% of the voted entries" in said and "K = 2" in said
    assert "GradFix 33.3% is not above few-shot fine-tuning of the target 55.4%" in said
    assert "the mask keeps little of what helps" in said
    only_oracle = {**held, "oracle mask": 0.45}  # GradFix beats fine-tuning; only the oracle mask is below it
    s2 = ordering.note(only_oracle, 0.9)
    assert "the oracle mask 45.0% is not above GradFix 50.0%" in s2 and "keeps little" not in s2


def test_ordering_measure_takes_known_rows_and_fine_tunes_on_the_same_shots(pair):
    from transport.core.evaluate import accuracy
    from transport.zoo import ordering

    A, B, task, tau, tau_b = pair
    m = ordering.measure(B, task, 1, 0, [0.0, 1.0], {"oracle mask": tau_b}, {"naive": 0.123, "GradFix": 0.456})
    assert m["naive"] == 0.123 and m["GradFix"] == 0.456 and m["K"] == 1
    # alpha 1 on tau_B is B's own fine-tune: the oracle row is at least what validation picks between B and it
    assert m["oracle mask"] in (accuracy(B, task), accuracy(B, task, "test", tau_b.apply_to(B.params, 1.0)))
    from transport.zoo.train import FEWSHOT_STEPS

    assert m["ft_choice"]["steps"] in (0,) + FEWSHOT_STEPS
