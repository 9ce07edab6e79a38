"""convert/imatrix.py: collection through our runtime vs transformers forward hooks on the same tiny
checkpoint; llama.cpp's imatrix GGUF round trip; hostile files; the packaged calibration text."""

import numpy as np
import pytest
import torch

import texts
import tiny_models
from qkvgguf.convert.imatrix import Imatrix, ImatrixError, collect_imatrix, default_calibration_text

HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    if hf == "lm_head":
        return "output.weight"
    parts = hf.split(".")  # model.layers.{i}.self_attn.q_proj
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:])]}.weight"


def _reference(model, chunks) -> dict[str, np.ndarray]:
    """Mean x^2 of every nn.Linear input over all positions of every chunk, from forward hooks."""
    sums, counts = {}, {}

    def hook(name):
        def f(_mod, inp, _out):
            x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + len(x)
        return f

    hooks = [m.register_forward_hook(hook(_gguf_name(n))) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for c in chunks:
            model(torch.tensor([c]))
    for h in hooks:
        h.remove()
    return {k: (sums[k] / counts[k]).numpy() for k in sums}, counts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_models.hf_model("llama", seed=3)
    path = tmp_path_factory.mktemp("imatrix") / "tiny-f32.gguf"
    tiny_models.write_gguf(model, "llama", str(path))
    return model, path


def test_collect_matches_transformers_hooks(tiny):
    model, path = tiny
    rng = np.random.default_rng(0)
    ids = rng.integers(3, tiny_models.VOCAB, 3 * 31 + 7).tolist()
    seen = []
    im = collect_imatrix(path, ids, n_ctx=32, bos_id=1, dataset="random ids", progress=lambda d, t: seen.append((d, t)))
    chunks = [[1] + ids[c * 31:(c + 1) * 31] for c in range(3)]  # BOS + 31 tokens, the tail dropped
    ref, counts = _reference(model, chunks)
    assert seen[-1] == (3, 3) and im.n_chunks == 3 and im.n_ctx == 32 and im.dataset == "random ids"
    assert set(im.values) == set(ref) and len(ref) == 2 * 7 + 1
    for name, r in ref.items():
        assert im.counts[name] == counts[name] == 96, name
        np.testing.assert_allclose(im.values[name], r, rtol=2e-4, atol=1e-7, err_msg=name)
    # n_chunks limits the chunks used
    assert collect_imatrix(path, ids, n_ctx=32, n_chunks=1, bos_id=1).counts["blk.0.attn_q.weight"] == 32


def test_too_short_text(tiny):
    with pytest.raises(ImatrixError, match="fewer than one chunk"):
        collect_imatrix(tiny[1], [5, 6, 7], n_ctx=32)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    im = Imatrix(datasets=["calib.txt"], n_chunks=4, chunk_size=512)
    for name, n in [("blk.0.attn_q.weight", 576), ("blk.0.ffn_down.weight", 1536), ("output.weight", 576)]:
        im.add(name, rng.standard_normal((2048, n)).astype(np.float32))
    path = tmp_path / "im.gguf"
    im.save(path)
    back = Imatrix.load(path)
    assert back.dataset == "calib.txt" and back.n_chunks == 4 and back.n_ctx == 512
    assert back.counts == im.counts
    for name in im.values:
        np.testing.assert_allclose(back.values[name], im.values[name], rtol=1e-6)
    # the layout llama.cpp writes (tools/imatrix/imatrix.cpp): general.type, datasets, counts tensors
    import gguf

    r = gguf.GGUFReader(path)
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "imatrix"
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_q.weight.in_sum2" in names and "blk.0.attn_q.weight.counts" in names
    assert not list(tmp_path.glob("*.tmp"))


def test_hostile_files(tmp_path):
    im = Imatrix(datasets=["x"], n_chunks=1, chunk_size=8)
    im.add("blk.0.attn_q.weight", np.ones((8, 64), np.float32))
    good = tmp_path / "good.gguf"
    im.save(good)
    data = good.read_bytes()
    cases = {"truncated.gguf": data[: len(data) - 100], "garbage.gguf": b"GGUF" + b"\xff" * 64, "empty.gguf": b""}
    for fname, blob in cases.items():
        p = tmp_path / fname
        p.write_bytes(blob)
        with pytest.raises(ImatrixError) as e:
            Imatrix.load(p)
        msg = str(e.value)
        assert fname in msg and "\n" not in msg, msg
    with pytest.raises(ImatrixError, match="missing.gguf"):
        Imatrix.load(tmp_path / "missing.gguf")


def test_not_an_imatrix(tmp_path, tiny):
    with pytest.raises(ImatrixError, match="expected 'imatrix'"):
        Imatrix.load(tiny[1])


def test_default_calibration_text():
    import texts

    name, text = default_calibration_text()
    assert "Sherlock" in name and 80_000 < len(text.encode()) < 200_000
    assert "Sherlock Holmes" in text and "Bohemia" in text
    wp = texts.war_and_peace()
    assert text[5000:5200] not in wp and "Natasha" not in text  # not the evaluation text
    assert text[5000:5200] in texts.sherlock()  # real text from the stated source


def test_calibrate_checkpoint_matches_transformers(tmp_path):
    """A tiny Hugging Face folder (SentencePiece, BOS added): converted to a temporary f16 GGUF,
    calibrated on real prose, the temporary file gone; statistics agree with hooks on the f32
    transformers model over the same chunks to f16 weight precision."""
    import sentencepiece as spm

    import test_convert
    from qkvgguf.convert.pipeline import calibrate_checkpoint

    model = test_convert.hf_model("llama", seed=5)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    test_convert.write_spm(folder)
    text = texts.sherlock()[:4000]
    import glob
    import tempfile

    leftovers = lambda: set(glob.glob(f"{tempfile.gettempdir()}/qkvgguf-calib-*"))  # noqa: E731
    before = leftovers()
    im = calibrate_checkpoint(folder, text, n_ctx=32, n_chunks=3, dataset="sherlock")
    assert im.n_chunks == 3 and im.dataset == "sherlock"
    ids = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(text)
    chunks = [[1] + ids[c * 31:(c + 1) * 31] for c in range(3)]
    ref, _ = _reference(model, chunks)
    assert set(im.values) == set(ref)
    for name, r in ref.items():
        np.testing.assert_allclose(im.values[name], r, rtol=2e-2, atol=1e-6, err_msg=name)
    assert leftovers() == before  # the temporary GGUF is deleted
