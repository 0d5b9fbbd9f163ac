"""LLM-Pruner's Taylor scores against an independent torch-autograd implementation on the
transformers Llama, the GQA block layout against the reference's modulo fold, and the baselines."""

import numpy as np
import pytest
from conftest import randomize_params
from flax import nnx

from nnxprune.errors import UserError
from nnxprune.graph import find_group
from nnxprune.models.llama import Llama, LlamaConfig
from nnxprune.scoring import get_score
from nnxprune.scoring.taylor import taylor_importance
from nnxprune.calibration.gradients import gradient_pass

N, T, K, G, DH = 4, 24, 2, 3, 8  # 2 KV heads, 3 query heads each


def gqa_model(seed=0):
    cfg = LlamaConfig.uniform(vocab_size=128, hidden_size=48, num_layers=2, num_heads=K * G,
                              num_kv_heads=K, intermediate_size=40, head_dim=DH)
    return randomize_params(Llama(cfg, rngs=nnx.Rngs(seed)), seed=seed, scale=0.15)


def calib_tokens(seed=0):
    return np.random.default_rng(seed).integers(0, 128, (N, T)).astype(np.int32)


def torch_reference(model, tokens, tmp_path):
    """Gradients and per-sample squared gradients of transformers' `model(x, labels=x).loss`,
    as LLM-Pruner's `hf_prune.py` computes them: `{hf weight name: (W, g, F)}` in [out, in]."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from nnxprune.io.hf import export_hf

    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    hf.eval()
    x = torch.tensor(tokens, dtype=torch.long)
    acc = {n: torch.zeros_like(p) for n, p in hf.named_parameters()}
    for j in range(len(tokens)):  # one backward per sequence, g^2 / n accumulated
        hf.zero_grad()
        hf(x[j:j + 1], labels=x[j:j + 1]).loss.backward()
        for n, p in hf.named_parameters():
            acc[n] += p.grad * p.grad / len(tokens)
    hf.zero_grad()
    loss = hf(x, labels=x).loss
    loss.backward()
    return float(loss.detach()), {n: (p.detach().numpy().astype(np.float64), p.grad.numpy().astype(np.float64),
                             acc[n].numpy().astype(np.float64)) for n, p in hf.named_parameters()}


def channel_values(w, g, f, variant, dim):
    """Per channel of `dim` of an HF weight [out, in] (0: output rows, 1: input columns)."""
    s, s2 = w * g, w * f * w
    other = 1 - dim
    return {"element1": np.abs(s).sum(other), "vector": np.abs(s.sum(other)),
            "element2": np.abs(s2).sum(other), "mix": np.abs(s - 0.5 * s2).sum(other)}[variant]


def ref_mlp(ref, layer, variant):
    p = f"model.layers.{layer}.mlp."
    return (channel_values(*ref[p + "gate_proj.weight"], variant, 0)
            + channel_values(*ref[p + "up_proj.weight"], variant, 0)
            + channel_values(*ref[p + "down_proj.weight"], variant, 1))


def ref_heads(ref, layer, variant):
    """Per-channel k+v values [K*DH] and q+o values [K*G*DH], unfolded."""
    p = f"model.layers.{layer}.self_attn."
    kv = (channel_values(*ref[p + "k_proj.weight"], variant, 0)
          + channel_values(*ref[p + "v_proj.weight"], variant, 0))
    qo = (channel_values(*ref[p + "q_proj.weight"], variant, 0)
          + channel_values(*ref[p + "o_proj.weight"], variant, 1))
    return kv, qo


def ref_kv_block(ref, layer, variant):
    """KV head j takes query heads G*j .. G*j+G-1 (transformers' repeat_kv)."""
    kv, qo = ref_heads(ref, layer, variant)
    return kv.reshape(K, DH).sum(1) + qo.reshape(K, G * DH).sum(1)


def ref_kv_modulo(ref, layer, variant):
    """The reference llama3.py fold: `imp.view(len(imp) // min, min).sum(0)`, then head sums."""
    kv, qo = ref_heads(ref, layer, variant)
    folded = qo.reshape(len(qo) // len(kv), len(kv)).sum(0)
    return (kv + folded).reshape(K, DH).sum(1)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    model, tokens = gqa_model(), calib_tokens()
    loss, ref = torch_reference(model, tokens, tmp_path_factory.mktemp("taylor"))
    return model, gradient_pass(model, tokens, second_order=True), loss, ref


def test_loss_equals_transformers(parity):
    _, grads, loss, _ = parity
    np.testing.assert_allclose(grads.loss, loss, rtol=1e-6)


@pytest.mark.parametrize("variant,score", [("element1", "taylor"), ("vector", "taylor_vector"),
                                           ("element2", "taylor_element2"), ("mix", "taylor_mix")])
@pytest.mark.parametrize("layer", [0, 1])
def test_scores_equal_torch_autograd(parity, variant, score, layer):
    model, grads, _, ref = parity
    mlp = get_score(score)(model, find_group(model, "mlp", layer), grads.stats)
    kv = get_score(score)(model, find_group(model, "kv", layer), grads.stats)
    # Two float32 backward passes (XLA's and torch's, each summing over N*T tokens in its own
    # order and kernel) give every product W*g with a relative error of a few hundred float32
    # ulps: 1e-5 is 84 ulps (2**-23 = 1.2e-7). A score that sums those products' magnitudes
    # (element1, element2, mix) keeps that relative error. The vector variant |sum W*g| cancels:
    # its error is bounded by 1e-5 times the sum of the magnitudes (the element1 score of the same
    # channel), which can be far more than 1e-5 of its value (2.2e-5 seen on an AVX-512 EPYC).
    bound = {"mlp": ref_mlp(ref, layer, "element1"), "kv": ref_kv_block(ref, layer, "element1")}
    for name, ours, want in (("mlp", mlp, ref_mlp(ref, layer, variant)),
                             ("kv", kv, ref_kv_block(ref, layer, variant))):
        tol = 1e-5 * (bound[name] if variant == "vector" else np.abs(want))
        assert np.all(np.abs(ours - want) <= tol), (name, np.max(np.abs(ours - want) / tol))
    assert np.ptp(mlp) > 0.1 * mlp.max()  # scores spread: the comparison means something


def ref_hidden(ref, variant):
    """Per hidden channel, every member of the hidden group as LLM-Pruner's `TaylorImportance`
    scores it (`--channel_wise`): embedding and head columns, norm entries (|s|, or |s2| for the
    second-order variants), projection inputs (q, k, v, gate, up) and outputs (o, down)."""
    def norm(w, g, f):
        s, s2 = w * g, w * f * w
        return {"element1": np.abs(s), "vector": np.abs(s), "element2": np.abs(s2),
                "mix": np.abs(s - 0.5 * s2)}[variant]
    total = channel_values(*ref["model.embed_tokens.weight"], variant, 1)
    total = total + channel_values(*ref["lm_head.weight"], variant, 1) + norm(*ref["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        total = total + norm(*ref[p + "input_layernorm.weight"]) + norm(*ref[p + "post_attention_layernorm.weight"])
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            total = total + channel_values(*ref[p + name + ".weight"], variant, 1)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            total = total + channel_values(*ref[p + name + ".weight"], variant, 0)
    return total


@pytest.mark.parametrize("variant,score", [("element1", "taylor"), ("element2", "taylor_element2"),
                                           ("mix", "taylor_mix")])
def test_hidden_channels_take_embedding_norm_and_head_terms(parity, variant, score):
    """The `embed` group (LLM-Pruner's channel mode) against torch autograd, every parameter's
    gradient included; without the norm terms the scores would differ."""
    from nnxprune.scoring.taylor import hidden_gradient_pass

    model, _, loss, ref = parity
    grads = hidden_gradient_pass(model, calib_tokens(), second_order=True)
    np.testing.assert_allclose(grads.loss, loss, rtol=1e-6)
    ours = get_score(score)(model, find_group(model, "embed"), grads.stats)
    want = ref_hidden(ref, variant)
    np.testing.assert_allclose(ours, want, rtol=1e-5)
    norms = sum(np.abs(ref[n][0] * ref[n][1]) for n in ref if n.endswith("norm.weight"))
    assert np.max(norms / want) > 1e-3  # the norm terms are a measurable part of the score
    # the block-mode pass has no gradients for the embedding, norms or head: none take part
    only_kernels = get_score(score)(model, find_group(model, "embed"), gradient_pass(
        model, calib_tokens(), second_order=True).stats)
    assert np.all(only_kernels < ours)


def test_kv_groups_follow_repeat_kv_blocks_not_the_reference_modulo_fold(tmp_path):
    """Query heads 1, 2, 3 made strong: by blocks KV head 0 holds two of them (1, 2), by the
    modulo fold KV head 1 does (1, 3). Ours ranks by blocks, as attention pairs the heads."""
    model, tokens = gqa_model(seed=1), calib_tokens(1)
    attn = model.layers[0].self_attn
    strong = np.ones(K * G * DH, np.float32)
    strong[DH:4 * DH] = 4.0
    attn.q_proj.kernel[...] = attn.q_proj.kernel[...] * strong[None, :]
    attn.o_proj.kernel[...] = attn.o_proj.kernel[...] * strong[:, None]
    _, ref = torch_reference(model, tokens, tmp_path)
    block, modulo = ref_kv_block(ref, 0, "element1"), ref_kv_modulo(ref, 0, "element1")
    assert np.argmax(block) == 0 and np.argmax(modulo) == 1  # the two mappings disagree
    ours = get_score("taylor")(model, find_group(model, "kv", 0), gradient_pass(model, tokens).stats)
    np.testing.assert_allclose(ours, block, rtol=1e-5)
    assert np.argmax(ours) == 0


def test_taylor_importance_gives_every_layer_and_variant(parity):
    model = parity[0]
    out = taylor_importance(model, calib_tokens(), variants=("element1", "vector", "element2"))
    assert {"taylor_mlp", "taylor_kv", "taylor_mlp_vector", "taylor_kv_vector",
            "taylor_mlp_element2", "taylor_kv_element2", "loss", "seconds"} <= set(out)
    assert [len(v) for v in out["taylor_mlp"]] == [40, 40]
    assert [len(v) for v in out["taylor_kv"]] == [K, K]
    np.testing.assert_allclose(out["loss"], parity[2], rtol=1e-6)
    np.testing.assert_allclose(out["taylor_kv"][1], get_score("taylor")(
        model, find_group(model, "kv", 1), parity[1].stats), rtol=1e-6)
    with pytest.raises(UserError, match="unknown Taylor variant"):
        taylor_importance(model, calib_tokens(), variants=("element3",))


def test_l2_is_members_averaged_sum_of_squares():
    model = gqa_model()
    g = find_group(model, "mlp", 0)
    m = model.layers[0].mlp
    want = ((m.gate_proj.kernel[...] ** 2).sum(0) + (m.up_proj.kernel[...] ** 2).sum(0)
            + (m.down_proj.kernel[...] ** 2).sum(1)) / 3
    np.testing.assert_allclose(get_score("l2")(model, g), want, rtol=1e-6)


def test_random_is_seeded_per_layer_and_kind():
    model = gqa_model()
    score = get_score("random")
    a, b = score(model, find_group(model, "mlp", 0)), score(model, find_group(model, "mlp", 1))
    np.testing.assert_array_equal(a, score(model, find_group(model, "mlp", 0)))
    assert not np.array_equal(a, b)


def test_gradient_score_without_gradients_is_a_user_error():
    model = gqa_model()
    with pytest.raises(UserError, match="needs gradients"):
        get_score("taylor")(model, find_group(model, "mlp", 0))
