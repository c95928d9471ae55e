"""Theseus on token-stem models: calibration rows are real tokens, both models read the same ids (one
tokenizer, refused otherwise), tied embeddings are mapped once, and a planted target (a hidden
symmetry / widening of a random GQA + rotary decoder) gets exactly the source's fine-tuned function."""
from __future__ import annotations

import pytest
import torch
from planted_decoders import decoder, logits, model, planted, random_tau, text_task

from transport.core.forward import encode
from transport.core.model import Model
from transport.core.procrustes import polar
from transport.errors import TransportError
from transport.methods import TransportInputs
from transport.methods.theseus import apply, prepare
from transport.methods.theseus_inputs import shares_token_ids, tokenizer_identity

torch.set_num_threads(1)
A_ARCH = decoder()
WIDE = decoder(width=64, heads=8, kv_heads=4, mlp_width=96, norm_eps=A_ARCH.norm_eps / 2, name="test:wide")


def fit(A, B, task, **options):
    return prepare(TransportInputs(A, B, task, seed=0), {"calib_size": len(task.split("train")[0]), **options})


@pytest.fixture(scope="module")
def task():
    return text_task(A_ARCH.vocab_size, n=40)


@pytest.fixture(scope="module", params=["same", "wide"])
def case(request, task):
    A = model(A_ARCH, 1)
    B, maps = planted(A, A_ARCH if request.param == "same" else WIDE, seed=2)
    return A, B, maps, fit(A, B, task)


def test_planted_decoder_is_the_same_function(case, task):
    A, B, _, _ = case
    batch = task.split("train")[0]
    assert (logits(A.params, A.arch, batch) - logits(B.params, B.arch, batch)).abs().max() < 1e-10


def test_planted_maps_recovered(case):
    A, B, maps, al = case
    for space, E in maps.items():
        got = al.maps["res:0" if space == "res" else space].double()
        assert (got - E).abs().max() < 1e-6, space
    for l in range(A.arch.layers):
        assert (al.maps[f"ln1:{l}"].double() - maps["res"]).abs().max() < 1e-6
        assert (al.maps[f"fc2:{l}"].double() - maps["res"]).abs().max() < 1e-6
    assert (al.maps["ln_post"].double() - maps["res"]).abs().max() < 1e-6
    d = al.diagnostics()
    assert d["heads"]["mode"] == "grouped" and all(x["qk_exact"] for x in d["heads"]["layers"])
    assert all(m["residual_after"] < 1e-6 for m in d["maps"]), [m["space"] for m in d["maps"]
                                                                  if m["residual_after"] >= 1e-6]


def test_planted_transport_gives_the_finetuned_function(case, task):
    A, B, _, al = case
    tau = random_tau(A.arch, 3)
    tau_b = apply(al, tau, 1.0)
    assert al.diagnostics()["zeroed"] == []
    batch = task.split("train")[0]
    f_ft = logits(tau.apply_to(A.params), A.arch, batch)
    change = (f_ft - logits(B.params, B.arch, batch)).abs().max()
    assert change > 1.0  # tau matters
    assert (logits(tau_b.apply_to(B.params), B.arch, batch) - f_ft).abs().max() < 1e-5 * change


def test_rows_are_the_real_tokens_only(task):
    """Padding never enters a cross-covariance: other pad ids give the same maps, and a map equals the polar
    factor of the cross-covariance of the real tokens' activations computed by hand."""
    A, B = model(A_ARCH, 1), model(A_ARCH, 5)  # unrelated models: nothing planted
    al = fit(A, B, task)
    other = text_task(A_ARCH.vocab_size, n=40, pad_id=7)
    again = fit(A, B, other)
    for k in al.maps:
        assert (again.maps[k] - al.maps[k]).abs().max() < 1e-6, k
    batch = task.calibration(40, 0)
    assert al.diagnostics()["calibration"] == {"kind": "texts", "samples": 40, "rows": batch.tokens}
    assert batch.tokens < batch.mask.numel()  # the batch does hold padding
    rec = {"A": {}, "B": {}}
    for tag, m in (("A", A), ("B", B)):
        encode(m.params, m.arch, batch, record=lambda site, x, tag=tag: rec[tag].setdefault(site, x))
    for site in ("res:1m", "act:0", "ln1:1"):
        xa, xb = rec["A"][site][batch.mask], rec["B"][site][batch.mask]
        T, _ = polar(xa.double().t() @ xb.double())
        assert (al.maps[site].double() - T).abs().max() < 1e-5, site
    s = al.pca_sample["res:1m"]["source"].float()  # one row per text: its last real token
    assert torch.allclose(s, rec["A"]["res:1m"][torch.arange(40), batch.last].float(), atol=1e-2, rtol=1e-2)


class Vocab:
    """A tokenizer stand-in: what Theseus reads of one is its token -> id table."""

    def __init__(self, vocab: dict, name: str = ""):
        self.vocab, self.name_or_path = vocab, name

    def get_vocab(self):
        return dict(self.vocab)


def test_shared_token_ids_hook():
    words = {f"w{i}": i for i in range(50)}
    a = model(A_ARCH, 1, "src", Vocab(words, "org/one"))
    assert tokenizer_identity(a.tokenizer).startswith("vocab:") and tokenizer_identity(None) is None
    assert tokenizer_identity(Vocab(dict(words))) == tokenizer_identity(a.tokenizer)  # the table, not the object
    assert shares_token_ids(a, model(A_ARCH, 2, "tgt", Vocab(dict(words), "org/two")))
    assert shares_token_ids(a, model(A_ARCH, 2, "tgt"))  # unknown tokenizer: the sizes decide
    swapped = {**words, "w0": 1, "w1": 0}
    assert not shares_token_ids(a, model(A_ARCH, 2, "tgt", Vocab(swapped)))
    assert not shares_token_ids(a, model(decoder(vocab_size=60), 2, "tgt"))


def test_different_vocabularies_are_refused(task):
    words = {f"w{i}": i for i in range(50)}
    A = model(A_ARCH, 1, "zoo:src", Vocab(words, "org/one"))
    with pytest.raises(TransportError) as e:
        fit(A, model(decoder(vocab_size=60), 2, "zoo:tgt"), task)
    assert str(e.value) == ("theseus: zoo:src and zoo:tgt do not share token ids (vocabularies of 50 and 60 tokens); "
                            "both models must read the same ids (one tokenizer)")
    other = Vocab({**words, "w0": 1, "w1": 0})
    with pytest.raises(TransportError, match=r"^theseus: zoo:src and zoo:tgt do not share token ids \(tokenizers "
                                             r"vocab:[0-9a-f]{16} and vocab:[0-9a-f]{16}\); both models must read"):
        fit(A, model(A_ARCH, 2, "zoo:tgt", other), task)
    tagged = text_task(50, n=8, tokenizer_id="org/other")
    with pytest.raises(TransportError, match=r"^theseus: task random-text was tokenised by org/other, not by the "
                                             r"tokenizer of zoo:src \(vocab:"):
        fit(A, model(A_ARCH, 2, "zoo:tgt", Vocab(dict(words), "org/one")), tagged)
    for ok in ("org/one", tokenizer_identity(A.tokenizer)):  # the task names the models' tokenizer
        fit(A, model(A_ARCH, 2, "zoo:tgt", Vocab(dict(words), "org/one")), text_task(50, n=8, tokenizer_id=ok))


def test_image_and_text_models_are_not_paired(task):
    from transport.families.open_clip import build_open_clip_tower, tiny_arch
    from transport.sources import to_canonical

    arch = tiny_arch(32, layers=2, heads=2)
    vit = Model(arch, to_canonical(build_open_clip_tower(arch).state_dict(), arch), "zoo:vit")
    with pytest.raises(TransportError) as e:
        fit(model(A_ARCH, 1, "zoo:src"), vit, task)
    assert str(e.value) == "theseus: zoo:src reads token ids, zoo:vit reads images: calibration rows cannot be paired"


def test_tied_embedding_is_mapped_once_with_the_input_embedding_map(task):
    A, B = model(A_ARCH, 1), model(A_ARCH, 5)  # unrelated: the input-embedding and final-norm maps differ
    al = fit(A, B, task)
    assert (al.maps["res:0"] - al.maps["ln_post"]).abs().max() > 0.1
    tau = random_tau(A.arch, 4)
    out = apply(al, tau, 1.0)
    assert "head.unembed" not in out.tensors  # one tensor, two roles
    expect = tau["embed.tokens"].float() @ al.maps["res:0"]
    assert torch.allclose(out["embed.tokens"], expect, atol=1e-6)
    ups = [u for u in al.diagnostics()["updates"] if u["block"] in ("embed", "unembed")]
    assert [(u["name"], u["source"]) for u in ups] == [("embed.tokens", "embed.tokens")]


def test_tied_source_serves_both_roles_of_an_untied_target(task):
    A = model(A_ARCH, 1)
    untied = A_ARCH.replace(tied_embeddings=False, name="test:untied")
    B = Model(untied, {**model(untied, 6).params, "embed.tokens": A.params["embed.tokens"].clone(),
                       "head.unembed": A.params["embed.tokens"].clone()}, "untied")
    al = fit(A, B, task)
    tau = random_tau(A.arch, 5)
    out = apply(al, tau, 1.0)
    assert torch.allclose(out["embed.tokens"], tau["embed.tokens"].float() @ al.maps["res:0"], atol=1e-6)
    assert torch.allclose(out["head.unembed"], tau["embed.tokens"].float() @ al.maps["ln_post"], atol=1e-6)
    src = {u["name"]: u["source"] for u in al.diagnostics()["updates"]}
    assert src["head.unembed"] == "embed.tokens" and "head.unembed" not in al.diagnostics()["zeroed"]


def test_untied_unembedding_under_a_tied_target_is_reported_unused(task):
    untied = A_ARCH.replace(tied_embeddings=False, name="test:untied")
    A = model(untied, 1)
    B = Model(A_ARCH, {**model(A_ARCH, 6).params, "embed.tokens": A.params["embed.tokens"].clone()}, "tied")
    al = fit(A, B, task)
    out = apply(al, random_tau(untied, 5), 1.0)
    assert set(out.tensors) == set(B.params) and al.diagnostics()["zeroed"] == []
    assert al.diagnostics()["unused"] == ["head.unembed"]  # the target's one tensor takes the input role's update
