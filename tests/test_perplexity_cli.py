"""Every flag of run / perplexity / bench reaches the model and its cache (issue 12), and the
perplexity verb's standard error and KL-divergence mode, on the real demo model.

A slice of War and Peace, -c 128, 2 windows: 254 scored tokens. The q4_0-cache runs are the slow
ones (the torch reference quantizes every layer's K and V), so each is made once per module.
"""

import contextlib
import io
import json
import math
import pathlib
import zipfile

import numpy as np
import pytest
import texts
import torch
from qkvgguf.runtime.model import Model

from qkvgguf.cli import main

from cli_errors import one_line_error

N_CTX, CHUNKS = 128, 2


def _main(*args):
    """main(args) in-process: (rc, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "wp.txt"
    path.write_text(texts.war_and_peace()[200_000:205_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ppl(smollm2_path, text_file):
    """perplexity --json of the demo model on the text, by cache types (and extra flags), cached."""
    runs = {}

    def get(ctk, ctv, *extra):
        key = (ctk, ctv, *extra)
        if key not in runs:
            rc, out, err = _main("perplexity", "-m", smollm2_path, "-f", text_file, "-c", N_CTX, "--chunks", CHUNKS,
                                 "-ctk", ctk, "-ctv", ctv, "--json", *extra)
            assert rc == 0, err
            runs[key] = json.loads(out)
        return runs[key]

    return get


@pytest.fixture(scope="module")
def api_model(smollm2_path, text_file):
    """The demo model through the Python API, and the CLI's tokens of the text (2 windows)."""
    from qkvgguf import GGUFFile
    from qkvgguf.tokenizer import Tokenizer

    gguf = GGUFFile(smollm2_path)
    tok = Tokenizer.from_gguf(gguf)
    ids = tok.encode(text_file.read_text(encoding="utf-8"), add_special=True, parse_special=False)
    return Model(gguf), tok, ids[: CHUNKS * N_CTX]


@pytest.fixture(scope="module")
def base_file(ppl, tmp_path_factory):
    """--save-logits of the f16 run; (path, its --json result)."""
    path = tmp_path_factory.mktemp("base") / "base.npz"
    res = ppl("f16", "f16", "--save-logits", str(path))
    return path, res


@pytest.fixture
def spy(monkeypatch):
    """Records every KV cache Model.new_cache makes and the token count of every forward call."""
    made, chunks = [], []
    new_cache, forward = Model.new_cache, Model.forward

    def spy_new_cache(self, *a, **k):
        made.append(new_cache(self, *a, **k))
        return made[-1]

    def spy_forward(self, tokens, cache, *a, **k):
        assert cache in made, "a cache not made by Model.new_cache"
        chunks.append(int(tokens.shape[0]))
        return forward(self, tokens, cache, *a, **k)

    monkeypatch.setattr(Model, "new_cache", spy_new_cache)
    monkeypatch.setattr(Model, "forward", spy_forward)
    return made, chunks


def _kv_bytes(path, n_ctx, tk, tv):
    from qkvgguf.kv_types import kv_cache_bytes

    from qkvgguf import GGUFFile, ModelConfig

    return kv_cache_bytes(ModelConfig.from_gguf(GGUFFile(path)), n_ctx, tk, tv)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# -- the flags reach the cache and the model -------------------------------------------------------

def test_perplexity_cache_types_change_the_result_and_match_the_api(ppl, api_model):
    from qkvgguf.runtime.perplexity import perplexity

    f16, q4 = ppl("f16", "f16"), ppl("q4_0", "q4_0")
    assert (q4["type_k"], q4["type_v"]) == ("q4_0", "q4_0") and q4["tokens_scored"] == CHUNKS * (N_CTX - 1)
    assert abs(q4["ppl"] / f16["ppl"] - 1) > 1e-3  # the bug of issue 12: both printed the f16 number
    model, tok, ids = api_model
    for res, t in ((q4, "q4_0"), (f16, "f16")):
        want = perplexity(model, ids, N_CTX, bos_id=tok.bos_id if tok.add_bos else None, type_k=t, type_v=t)
        assert res["ppl"] == pytest.approx(want.ppl, rel=1e-6), t
        assert res["nll_stderr"] == pytest.approx(want.nll_stderr, rel=1e-6), t


def test_numerics_flag_reaches_the_model(ppl, api_model):
    """--numerics llamacpp (matmul inputs rounded as llama.cpp's CPU backend does) moves the result,
    says so in --json, and is the API's Model(numerics="llamacpp")."""
    from qkvgguf import GGUFFile
    from qkvgguf.runtime.perplexity import perplexity

    exact, rounded = ppl("f32", "f32"), ppl("f32", "f32", "--numerics", "llamacpp")
    assert (exact["numerics"], rounded["numerics"]) == ("exact", "llamacpp")
    assert 1e-5 < abs(rounded["ppl"] / exact["ppl"] - 1) < 0.05
    model, tok, ids = api_model
    want = perplexity(Model(GGUFFile(model.gguf.path), numerics="llamacpp"), ids, N_CTX,
                      bos_id=tok.bos_id if tok.add_bos else None, type_k="f32", type_v="f32")
    assert rounded["ppl"] == pytest.approx(want.ppl, rel=1e-6)


def test_perplexity_flags_reach_the_caches_and_batches(smollm2_path, text_file, spy, restore_threads):
    made, chunks = spy
    rc, _, err = _main("perplexity", "-m", smollm2_path, "-f", text_file, "-c", N_CTX, "--chunks", CHUNKS,
                       "-ctk", "q8_0", "-ctv", "f32", "-b", 50, "-t", 1, "--json")
    assert rc == 0, err
    assert [(c.type_k, c.type_v, c.n_ctx) for c in made] == [("q8_0", "f32", N_CTX)] * CHUNKS
    assert made[0].n_bytes == _kv_bytes(smollm2_path, N_CTX, "q8_0", "f32")
    assert chunks == [50, 50, 28] * CHUNKS  # -b
    assert torch.get_num_threads() == 1  # -t


def test_run_builds_its_cache_from_the_flags(smollm2_path, spy, restore_threads):
    made, chunks = spy
    rc, _, err = _main("run", "-m", smollm2_path, "-c", 64, "-n", 3, "--temp", 0, "-ctk", "q8_0", "-ctv", "q4_0",
                       "-b", 4, "-t", 1, "--no-cuda-graph", "The capital of France is")
    assert rc == 0, err
    assert len(made) == 1 and (made[0].type_k, made[0].type_v, made[0].n_ctx) == ("q8_0", "q4_0", 64)
    assert made[0].n_bytes == _kv_bytes(smollm2_path, 64, "q8_0", "q4_0") != _kv_bytes(smollm2_path, 64, "f16", "f16")
    assert type(made[0].k_store).__name__ == "BlockStore" and made[0].k_store.name == "q8_0"
    assert type(made[0].v_store).__name__ == "BlockStore" and made[0].v_store.name == "q4_0"
    prompt, steps = chunks[:-2], chunks[-2:]  # -n 3: the prompt in -b 4 chunks, then 2 one-token steps
    assert len(prompt) >= 2 and prompt[:-1] == [4] * (len(prompt) - 1) and prompt[-1] <= 4, chunks
    assert steps == [1, 1], chunks
    assert torch.get_num_threads() == 1  # -t


def test_bench_reports_the_cache_it_built(smollm2_path, spy):
    made, chunks = spy
    rc, out, err = _main("bench", "-m", smollm2_path, "-p", 12, "-n", 3, "-b", 5, "-ctk", "q8_0", "-ctv", "q4_0",
                         "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert len(made) == 1
    assert (r["type_k"], r["type_v"], r["n_ctx"]) == (made[0].type_k, made[0].type_v, made[0].n_ctx) == ("q8_0", "q4_0", 15)
    assert r["kv_bytes"] == made[0].n_bytes == _kv_bytes(smollm2_path, 15, "q8_0", "q4_0")
    assert r["n_batch"] == 5 and [5, 5, 2] == [c for c in chunks if c > 1][-3:]  # the timed prompt, in -b chunks
    assert r["cuda_graph"] is False  # on the CPU: no graph whatever the flag


def test_bad_cache_type_names_the_flag(smollm2_path, text_file):
    rc, _, err = _main("perplexity", "-m", smollm2_path, "-f", text_file, "-ctv", "q5_9")
    one_line_error(rc, err, "-ctv", "q5_9")


# -- standard error ------------------------------------------------------------------------------

def test_stderr_matches_a_direct_computation(smollm2_path, text_file, ppl, api_model):
    model, tok, ids = api_model
    nll = []
    for w in range(CHUNKS):
        window = ids[w * N_CTX:(w + 1) * N_CTX]
        window = [tok.bos_id] + window[1:] if tok.add_bos else window
        logits = model.forward(torch.tensor(window), model.new_cache(N_CTX, "f16", "f16"), logits="all")
        lp = torch.log_softmax(logits.double(), dim=-1)
        nll += (-lp[:-1].gather(1, torch.tensor(window[1:])[:, None])[:, 0]).tolist()
    nll = np.array(nll)
    mean = nll.mean()
    se = math.sqrt(((nll - mean) ** 2).sum() / (len(nll) - 1)) / math.sqrt(len(nll))
    res = ppl("f16", "f16")
    assert res["tokens_scored"] == len(nll)
    assert res["nll"] == pytest.approx(mean, rel=1e-5)
    assert res["nll_stderr"] == pytest.approx(se, rel=1e-4)
    assert res["ppl_stderr"] == pytest.approx(math.exp(mean) * se, rel=1e-4)
    per_window = nll.reshape(CHUNKS, -1).mean(axis=1)  # --json's window_nll: each window's mean NLL
    assert res["window_nll"] == pytest.approx(per_window.tolist(), rel=1e-5)
    rc, out, err = _main("perplexity", "-m", smollm2_path, "-f", text_file, "-c", N_CTX, "--chunks", CHUNKS)
    assert rc == 0, err
    assert out.startswith(f"PPL = {res['ppl']:.4f} ± {res['ppl_stderr']:.5f}"), out


# -- KL divergence -------------------------------------------------------------------------------

def test_save_logits_file(base_file, api_model):
    path, res = base_file
    _, _, ids = api_model
    assert res["saved_logits"] == str(path) and not list(path.parent.glob("*.tmp*"))
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["logprobs", "meta", "nll", "tokens"]
        lp, tokens, nll = z["logprobs"], z["tokens"], z["nll"]
    n = CHUNKS * (N_CTX - 1)
    assert lp.dtype == np.float16 and lp.shape == (n, 49152)
    assert tokens.tolist() == ids and nll.shape == (n,)
    assert np.exp(lp.astype(np.float64)).sum(1) == pytest.approx(np.ones(n), abs=2e-3)  # log-softmax rows
    assert math.exp(nll.mean()) == pytest.approx(res["ppl"], rel=1e-9)
    # the saved row of scored token j predicts token j + 1 of its window (BOS swap aside): its -log p is nll
    j = 5
    assert -float(lp[j, ids[j + 1]]) == pytest.approx(nll[j], abs=1e-2)


def test_kld_of_a_run_with_itself_is_zero(base_file, ppl):
    path, base = base_file
    res = ppl("f16", "f16", "--kl-divergence", str(path))
    k = res["kl_divergence"]
    assert k["n_tokens"] == base["tokens_scored"]
    assert abs(k["kld_mean"]) < 1e-6 and k["kld_max"] < 1e-6 and k["same_top_pct"] == 100.0
    assert k["base_ppl"] == pytest.approx(res["ppl"], rel=1e-9) == base["ppl"]


def test_kld_of_a_q4_0_cache(base_file, ppl):
    path, base = base_file
    res = ppl("q4_0", "q4_0", "--kl-divergence", str(path))
    k = res["kl_divergence"]
    assert res["ppl"] == ppl("q4_0", "q4_0")["ppl"]  # comparing changes nothing in the run itself
    assert k["base_ppl"] == pytest.approx(base["ppl"], rel=1e-12) and res["ppl"] != base["ppl"]
    assert 1e-3 < k["kld_mean"] < 1 and 0 < k["kld_stderr"] < k["kld_mean"]
    assert 0 < k["kld_median"] <= k["kld_p99"] <= k["kld_max"]
    assert 50 < k["same_top_pct"] < 100


def test_kld_text_output(smollm2_path, text_file, base_file):
    path, _ = base_file
    rc, out, err = _main("perplexity", "-m", smollm2_path, "-f", text_file, "-c", N_CTX, "--chunks", CHUNKS,
                         "--kl-divergence", path)
    assert rc == 0, err
    for needle in ("base PPL = ", "mean KLD = 0.000000 ± 0.000000", "99th percentile KLD = ",
                   "median KLD = ", "same top token = 100.000"):
        assert needle in out, out


@pytest.mark.parametrize("n_ctx, chunks, other_text, needle", [
    (64, 4, False, "saved with -c 128, this run uses -c 64"),  # the same tokens in other windows
    (N_CTX, 1, False, "saved over 256 tokens, this run has 128"),
    (N_CTX, CHUNKS, True, "a different text"),  # as many tokens, other ids
])
def test_kld_mismatch_is_aone_line_error(smollm2_path, text_file, base_file, tmp_path, n_ctx, chunks, other_text,
                                          needle):
    path, _ = base_file
    text = text_file
    if other_text:
        text = tmp_path / "other.txt"
        text.write_text(texts.sherlock()[50_000:55_000], encoding="utf-8")
    rc, out, err = _main("perplexity", "-m", smollm2_path, "-f", text, "-c", n_ctx, "--chunks", chunks,
                         "--kl-divergence", path)
    one_line_error(rc, err, str(path), needle)
    assert out == ""


class _Touch:
    """Unpickling this creates a file: the reader must never unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _bad_files(good: pathlib.Path, tmp: pathlib.Path):
    data = good.read_bytes()
    (tmp / "cut.npz").write_bytes(data[: len(data) // 2])  # zip directory gone
    (tmp / "garbage.npz").write_bytes(b"\x93NUMPY not really" * 1000)
    (tmp / "empty.npz").write_bytes(b"")
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp / "short.npz", "w") as dst:  # logprobs cut short
        for name in src.namelist():
            body = src.read(name)
            dst.writestr(name, body[: len(body) // 3] if name == "logprobs.npy" else body)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp / "nomember.npz", "w") as dst:
        for name in src.namelist():
            if name != "nll.npy":
                dst.writestr(name, src.read(name))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp / "pickle.npz", "w") as dst:
        for name in src.namelist():
            if name == "tokens.npy":
                with dst.open(name, "w") as f:
                    np.lib.format.write_array(f, np.array([_Touch(tmp / "unpickled")], dtype=object), allow_pickle=True)
            else:
                dst.writestr(name, src.read(name))
    return ["cut.npz", "garbage.npz", "empty.npz", "short.npz", "nomember.npz", "pickle.npz"]


def test_kld_bad_file_is_aone_line_error(smollm2_path, text_file, base_file, tmp_path):
    path, _ = base_file
    for name in _bad_files(path, tmp_path):
        bad = tmp_path / name
        rc, out, err = _main("perplexity", "-m", smollm2_path, "-f", text_file, "-c", N_CTX, "--chunks", CHUNKS,
                             "--kl-divergence", bad)
        one_line_error(rc, err, str(bad))
        assert out == "", name
    assert not (tmp_path / "unpickled").exists()
    rc, _, err = _main("perplexity", "-m", smollm2_path, "-f", text_file, "--kl-divergence", tmp_path / "nope.npz")
    one_line_error(rc, err, "nope.npz", "no such file")


def test_kld_bad_file_subprocess_no_traceback(text_file, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    p = subprocess.run([sys.executable, "-m", "qkvgguf", "perplexity", "-f", str(text_file), "--kl-divergence",
                        str(bad)], check=False, capture_output=True, text=True, timeout=300)
    err = "\n".join(line for line in p.stderr.splitlines() if "no -m given" not in line)
    one_line_error(p.returncode, err, str(bad))


def test_run_config_from_python(smollm2_path):
    from qkvgguf.errors import QkvggufError
    from qkvgguf.run_config import RunConfig

    cfg = RunConfig(model=smollm2_path, n_ctx=64, type_k="q8_0", type_v="q4_0", device="cpu", n_batch=8,
                    cuda_graph=False)
    model, _, n_ctx = cfg.load(log=lambda msg: None)
    session = cfg.new_session(model, n_ctx)
    assert n_ctx == 64 and (session.n_batch, session.cuda_graph) == (8, False)
    assert (session.cache.type_k, session.cache.type_v, session.cache.n_ctx) == ("q8_0", "q4_0", 64)
    assert cfg.new_cache(model, 32).n_bytes == _kv_bytes(smollm2_path, 32, "q8_0", "q4_0")
    for bad, flag in (({"threads": 0}, "--threads"), ({"n_batch": 0}, "--batch-size"), ({"type_k": "q5_9"}, "-ctk"),
                      ({"cpu_cache": "lots"}, "lots"), ({"device": "tpu"}, "--device")):
        with pytest.raises(QkvggufError, match=flag):
            RunConfig(model=smollm2_path, **bad).validate()
