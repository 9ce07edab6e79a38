"""The off-grid benchmark source (tests/hf_checkpoint.py, rotate=True): SmolLM2's exact function
with every weight off the Q4_1 grid its published weights lie on.

A quantizer benchmark on the demo weights rewards whichever method lands on Q4_1's grid (those
weights round-trip through Q4_1 without error). Rotating the residual stream by a random
orthogonal matrix, with the norm gains folded into the matrices, keeps the logits and moves every
weight off every grid: checked here against transformers on real text.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from hf_checkpoint import smollm2_hf_folder


@pytest.fixture(scope="module")
def folders(smollm2_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("offgrid")
    return (smollm2_hf_folder(smollm2_path, base / "plain"),
            smollm2_hf_folder(smollm2_path, base / "rotated", rotate=True, seed=1))


def _state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_rotated_model_computes_the_same_logits(folders, smollm2_path):
    import transformers as tf

    import texts
    from qkvgguf import GGUFFile
    from qkvgguf.tokenizer import Tokenizer

    ids = Tokenizer.from_gguf(GGUFFile(smollm2_path)).encode(texts.war_and_peace()[50_000:52_000])[:64]
    logits = []
    for folder in folders:
        model = tf.LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(torch.tensor([ids])).logits[0].double())
    plain, rotated = logits
    assert (rotated - plain).abs().max() / plain.abs().max() < 1e-4
    assert (rotated.argmax(-1) == plain.argmax(-1)).all()
    rot = _state(folders[1])
    assert not torch.equal(rot["lm_head.weight"], rot["model.embed_tokens.weight"])  # untied
    assert (rot["model.norm.weight"] == 1).all() and (rot["model.layers.3.input_layernorm.weight"] == 1).all()


def test_rotated_weights_lie_on_no_q4_1_grid(folders):
    from qkvgguf.quants import dequantize, quantize

    def q4_1_error(w):
        w = w.numpy()
        back = dequantize(torch.from_numpy(np.asarray(quantize(w, T.Q4_1))), T.Q4_1).numpy().reshape(w.shape)
        return float(np.sqrt(((back - w) ** 2).mean()) / w.std())

    plain, rotated = (_state(f)["model.layers.5.mlp.gate_proj.weight"] for f in folders)
    assert q4_1_error(plain) < 1e-6  # the published weights: exactly on Q4_1's grid
    assert q4_1_error(rotated) > 0.05  # rotated: an ordinary 4-bit rounding error
