"""The Fisher pass (convert/fisher.py) and `auto`'s use of it (convert/mixed.py).

- the Fisher diagonal predicts the KL divergence that perturbing one weight causes, measured
  through the runtime on the same tokens: a matmul inside a block, the output head, and the token
  embedding (a lookup), in the full and the rank-1 forms; a wrong unit (a missing 1/2 or 1/T, the
  wrong gradient) fails by a factor of 2 or more
- the pass's importance matrix is the one collect_imatrix collects (the same sums)
- sample_rows: every row when there are few, an unbiased estimate of a row sum otherwise
- `--sensitivity` reaches the file's metadata; the old proxy stays selectable
"""

import numpy as np
import pytest
import torch

from qkvgguf import GGUFFile
from qkvgguf.convert import convert
from qkvgguf.convert.fisher import collect_fisher
from qkvgguf.convert.imatrix import collect_imatrix
from qkvgguf.convert.mixed import sample_rows
from qkvgguf.runtime import Model
from qkvgguf.tokenizer import Tokenizer

import texts

N_CTX, CHUNKS = 128, 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_convert import hf_model, write_spm

    folder = tmp_path_factory.mktemp("fisher-hf")
    model = hf_model("llama", seed=7)
    model.save_pretrained(folder)
    write_spm(folder)
    f32 = folder.parent / "fisher-f32.gguf"
    convert(folder, f32, "f32")
    tok = Tokenizer.from_gguf(GGUFFile(str(f32)))
    ids = tok.encode(texts.sherlock()[200_000:230_000], add_special=False)
    return folder, model, f32, ids, tok.bos_id


def _chunks(ids, bos):
    step = N_CTX - 1
    return [[bos] + ids[c * step:(c + 1) * step] for c in range(CHUNKS)]


def _log_probs(path, chunks):
    model = Model(GGUFFile(str(path)))
    return [torch.log_softmax(model.forward(torch.tensor(c), model.new_cache(N_CTX), logits="all"), -1)
            for c in chunks]


@pytest.fixture(scope="module")
def fishers(tiny):
    _, _, f32, ids, bos = tiny
    return {form: collect_fisher(str(f32), ids, N_CTX, CHUNKS, bos, form=form) for form in ("full", "rank1")}


@pytest.mark.parametrize("gguf_name,hf_name", [
    ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
    ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
    ("output.weight", "lm_head.weight"),
    ("token_embd.weight", "model.embed_tokens.weight"),
])
def test_fisher_predicts_the_kl_of_a_perturbation(tiny, fishers, tmp_path, gguf_name, hf_name):
    folder, model, f32, ids, bos = tiny
    import copy

    perturbed = copy.deepcopy(model)
    p = dict(perturbed.named_parameters())[hf_name]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        delta = torch.randn(p.shape, generator=gen) * p.std() * 0.05
        p.add_(delta)
    (tmp_path / "hf").mkdir()
    perturbed.save_pretrained(tmp_path / "hf")
    for f in ("tokenizer.model", "tokenizer_config.json"):
        (tmp_path / "hf" / f).write_bytes((folder / f).read_bytes())
    out = tmp_path / "perturbed.gguf"
    convert(tmp_path / "hf", out, "f32")
    chunks = _chunks(ids, bos)
    kl = []
    for a, b in zip(_log_probs(f32, chunks), _log_probs(out, chunks)):
        kl.append((a.exp() * (a - b)).sum(-1))
    measured = float(torch.cat(kl).mean())
    d2 = delta.numpy().astype(np.float64) ** 2
    rows = np.arange(d2.shape[0])
    for form, lo, hi in (("full", 0.6, 1.6), ("rank1", 0.4, 2.5)):
        predicted = 0.5 * float((fishers[form].weights(gguf_name, rows) * d2).sum())
        assert lo < predicted / measured < hi, (form, predicted, measured)


def test_the_pass_collects_the_importance_matrix(tiny, fishers):
    _, _, f32, ids, bos = tiny
    ref = collect_imatrix(str(f32), ids, N_CTX, CHUNKS, bos)
    got = fishers["rank1"].imatrix
    assert set(got.sums) == set(ref.sums) and got.counts == ref.counts
    for name in ref.sums:
        np.testing.assert_allclose(got.sums[name], ref.sums[name], rtol=1e-4)


def test_rank1_and_full_agree_on_each_tensors_total(fishers):
    """sum_ij F_ij over a tensor: rank-1 drops the correlation of g^2 and x^2, not the scale."""
    full, rank1 = fishers["full"], fishers["rank1"]
    for name in full.out_sq:
        rows = np.arange(len(full.out_sq[name]))
        a, b = full.weights(name, rows).sum(), rank1.weights(name, rows).sum()
        assert 0.5 < a / b < 2.0, name


def test_sample_rows():
    rows, w = sample_rows(np.ones(10), 10, m=16)
    assert rows.tolist() == list(range(10)) and (w == 1).all()
    n, err_scored, err_even = 20_000, [], []
    for seed in range(20):  # heavy-tailed row sums, like an output head's: what the scores are for
        rng = np.random.default_rng(seed)
        scores = rng.pareto(1.5, n) + 1e-3
        y = scores * rng.uniform(0.5, 1.5, n)
        rows, w = sample_rows(scores, n, m=256)
        assert len(rows) <= 256 and np.all(np.diff(rows) > 0)
        err_scored.append(abs(float((w * y[rows]).sum()) / y.sum() - 1))
        pick, w = sample_rows(None, n, m=256)  # no scores: evenly spaced rows
        assert len(pick) == 256 and np.allclose(w, n / 256)
        err_even.append(abs(float((w * y[pick]).sum()) / y.sum() - 1))
    # measured: mean 3.1% (max 7.0%) against evenly spaced rows' 22.5% (max 66%)
    assert np.mean(err_scored) < 0.05 and max(err_scored) < 0.12
    assert np.mean(err_scored) < np.mean(err_even) / 4


@pytest.mark.parametrize("flag,expect", [("fisher", "fisher-rank1"), ("weighted", "imatrix-weighted")])
def test_sensitivity_flag(tiny, tmp_path, flag, expect):
    from qkvgguf.cli import main

    folder = tiny[0]
    calib = tmp_path / "calib.txt"
    calib.write_text(texts.sherlock()[100_000:130_000])
    out = tmp_path / "auto.gguf"
    assert main(["convert", str(folder), "-o", str(out), "--outtype", "auto", "--target-bpw", "6", "--calib",
                 str(calib), "--calib-chunks", "1", "--sensitivity", flag]) == 0
    g = GGUFFile(str(out))
    assert g.metadata["qkvgguf.auto.sensitivity"] == expect
    assert 8 * g.tensor_data_bytes / sum(t.n_elements for t in g.tensors.values()) <= 6.0
