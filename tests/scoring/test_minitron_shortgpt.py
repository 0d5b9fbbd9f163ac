"""ShortGPT's block influence and Minitron's activation importance against an independent
implementation: `transformers`' LlamaForCausalLM, loaded from our HF export, with forward hooks
(the way the reference codes gather them), on a tiny random GQA Llama; to 1e-5 relative."""

import numpy as np
import pytest
import torch
from conftest import randomize_params
from flax import nnx

from nnxprune.calibration.sequential import collect_statistics
from nnxprune.errors import UserError
from nnxprune.graph import find_group
from nnxprune.io.hf import export_hf
from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.scoring import get_score

CFG = LlamaConfig.uniform(vocab_size=128, hidden_size=48, num_layers=3, num_heads=6,
                          num_kv_heads=2, intermediate_size=80, head_dim=8,
                          max_position_embeddings=128)
TOKENS = np.random.default_rng(3).integers(0, 128, (5, 40)).astype(np.int32)


def hooked_reference(folder):
    """BI per layer, and per layer `imp` of the down_proj input, the o_proj input and both
    norms' outputs, from transformers with forward hooks; one sequence per sample."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    n = CFG.num_layers
    cos_sum, means = [0.0] * n, {}

    def keep_mean_abs(key):
        def hook(module, args, out):
            x = (args[0] if key[1] in ("down", "o") else out).double()
            means.setdefault(key, []).append(x.abs().mean(dim=1)[0])  # [channels], one sample
        return hook

    def layer_hook(i):
        def hook(module, args, out):
            h_in, h_out = args[0].double(), (out[0] if isinstance(out, tuple) else out).double()
            cos_sum[i] += torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).sum().item()
        return hook

    for i, layer in enumerate(hf.model.layers):
        layer.register_forward_hook(layer_hook(i))
        layer.mlp.down_proj.register_forward_hook(keep_mean_abs((i, "down")))
        layer.self_attn.o_proj.register_forward_hook(keep_mean_abs((i, "o")))
        layer.input_layernorm.register_forward_hook(keep_mean_abs((i, "norm1")))
        layer.post_attention_layernorm.register_forward_hook(keep_mean_abs((i, "norm2")))
    with torch.no_grad():
        for row in TOKENS:  # one calibration sequence per sample
            hf(torch.as_tensor(row[None], dtype=torch.long))
    bi = [1 - c / TOKENS.size for c in cos_sum]
    imp = {k: torch.stack(v).pow(2).sum(0).sqrt().numpy() for k, v in means.items()}
    return np.asarray(bi), imp


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = randomize_params(Llama(CFG, rngs=nnx.Rngs(0)), seed=2, scale=0.3)
    folder = export_hf(model, tmp_path_factory.mktemp("hf") / "hf")
    return model, hooked_reference(folder)


def test_block_influence_matches_transformers_hooks(setup):
    model, (bi_ref, _) = setup
    score = get_score("block_influence")
    stats = collect_statistics(model, TOKENS, score.collectors(), progress=False)
    ours = [score(model, find_group(model, "layer", i), stats)[0] for i in range(CFG.num_layers)]
    np.testing.assert_allclose(ours, bi_ref, rtol=1e-5)


def test_activation_importance_matches_transformers_hooks(setup):
    model, (_, imp) = setup
    score = get_score("activation")
    stats = collect_statistics(model, TOKENS, score.collectors(), progress=False, batch_size=2)
    hidden = sum(imp[(i, n)] for i in range(CFG.num_layers) for n in ("norm1", "norm2"))
    np.testing.assert_allclose(score(model, find_group(model, "embed"), stats), hidden, rtol=1e-5)
    per_kv = CFG.layers[0].num_heads // CFG.layers[0].num_kv_heads
    for i in range(CFG.num_layers):
        np.testing.assert_allclose(score(model, find_group(model, "mlp", i), stats),
                                   imp[(i, "down")], rtol=1e-5)
        heads = imp[(i, "o")].reshape(CFG.layers[i].num_heads, CFG.head_dim)
        np.testing.assert_allclose(score(model, find_group(model, "q", i), stats),
                                   np.linalg.norm(heads, axis=1), rtol=1e-5)
        groups = heads.reshape(-1, per_kv * CFG.head_dim)
        np.testing.assert_allclose(score(model, find_group(model, "kv", i), stats),
                                   np.linalg.norm(groups, axis=1), rtol=1e-5)


def test_scores_refuse_groups_they_cannot_rank():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="ranks layer groups, not 'mlp'"):
        get_score("block_influence").check_kind("mlp")
    with pytest.raises(UserError, match="not 'layer'"):
        get_score("activation")(model, find_group(model, "layer", 0), {})
