"""`fisao_jax.policy.response_logprobs` (log-probs, values, entropy) against transformers.

The policy is a tiny random LLaVA saved by transformers, loaded with LoRA adapters (rank 4,
alpha 8) whose B matrices and value head are random (non-zero), so that the adapters and the
value head change every compared number. The reference is the same transformers model with
each adapter merged into its weight by hand (W + alpha / r * (A @ B)^T: our kernels are
[in, out], torch weights [out, in]); reference log-probs and entropies are a float64 NumPy
log-softmax of its logits at the positions that predict each response token, reference
values its last hidden state (after the final RMSNorm) times our value head.

Prompts are left padded (with an image each), responses right padded to different lengths.
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fisao_jax import policy
from fisao_jax.models import hf_io
from fisao_jax.models.configs import LoRAConfig

torch = pytest.importorskip("torch")
import hf_tiny  # noqa: E402

RANK, ALPHA = 4, 8.0
LENGTHS = (6, 3, 1)  # response lengths of the three rows (N = 6)
N = max(LENGTHS)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _perturbed(params):
    """Random LoRA B (A is already random) and a random value-head kernel and bias."""
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))

    def perturb(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "lora_b" or names[0] == "value_head":
            return (x + 0.3 * jax.random.normal(next(keys), x.shape)).astype(x.dtype)
        return x
    return jax.tree_util.tree_map_with_path(perturb, params)


def _merged_torch_model(hf_model, params):
    """A copy of the transformers model with every LoRA adapter of `params` folded in."""
    merged = copy.deepcopy(hf_model)
    modules = dict(merged.named_modules())
    lm = params["language_model"]
    layers = sorted((k for k in lm if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    assert len(layers) == hf_model.config.text_config.num_hidden_layers
    count = 0
    with torch.no_grad():
        for name in layers:
            i = int(name.split("_")[1])
            for proj in PROJECTIONS:
                sub, leaf = proj.split(".")
                p = lm[name][sub][leaf]
                a, b = np.asarray(p["lora_a"], np.float64), np.asarray(p["lora_b"], np.float64)
                delta = (ALPHA / RANK) * (a @ b)  # [in, out]
                [torch_name] = [n for n in modules if n.endswith(f"language_model.layers.{i}.{proj}")]
                w = modules[torch_name].weight  # [out, in]
                assert tuple(w.shape) == delta.T.shape
                w.add_(torch.tensor(delta.T, dtype=w.dtype))
                count += 1
    assert count == 7 * len(layers)
    return merged


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    hf_model = hf_tiny.save_llava(root, seed=5)
    module, params = hf_io.from_hf(root, lora=LoRAConfig(rank=RANK, alpha=ALPHA), lora_key=jax.random.PRNGKey(0))
    params = _perturbed(params)
    assert float(jnp.abs(params["value_head"]["bias"]).max()) > 0.01  # the bias is not zero either
    ids, mask, pixels, _ = hf_tiny.llava_inputs(module.cfg.num_image_tokens, (1, 1, 1), (0, 3, 5), seed=2)
    rng = np.random.RandomState(3)
    tokens = np.zeros((3, N), np.int64)
    resp_mask = np.zeros((3, N), np.int64)
    for b, n in enumerate(LENGTHS):
        tokens[b, :n] = rng.randint(3, hf_tiny.IMAGE_TOKEN, n)  # never the image token
        resp_mask[b, :n] = 1
    return dict(root=root, hf_model=hf_model, module=module, params=params, ids=ids, mask=mask, pixels=pixels,
                tokens=tokens, resp_mask=resp_mask, refs={})


def _reference(c, temperature):
    """(log-probs, entropy, values, logits at the predicting positions) from transformers, float64."""
    if temperature not in c["refs"]:
        c["refs"][temperature] = _compute_reference(c, temperature)
    return c["refs"][temperature]


def _compute_reference(c, temperature):
    merged = _merged_torch_model(c["hf_model"], c["params"])
    t = c["ids"].shape[1]
    full_ids = np.concatenate([c["ids"], c["tokens"]], axis=1)
    full_mask = np.concatenate([c["mask"], c["resp_mask"]], axis=1)
    pos = np.maximum(full_mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = merged(input_ids=torch.tensor(full_ids), pixel_values=torch.tensor(c["pixels"]),
                     attention_mask=torch.tensor(full_mask), position_ids=torch.tensor(pos),
                     output_hidden_states=True)
        logits = out.logits.numpy().astype(np.float64)
        hidden = out.hidden_states[-1]
        # transformers' last hidden state is after the final norm: the LM head of it is the logits
        head = merged.lm_head(hidden).numpy()
        assert np.abs(head - out.logits.numpy()).max() <= 1e-5
        hidden = hidden.numpy().astype(np.float64)
    z = logits[:, t - 1:t - 1 + N] / temperature  # position t-1+i predicts response token i
    z = z - z.max(-1, keepdims=True)
    logsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
    logp = np.take_along_axis(logsm, c["tokens"][..., None], axis=-1)[..., 0]
    entropy = -(np.exp(logsm) * logsm).sum(-1)
    vh = c["params"]["value_head"]
    kernel, bias = np.asarray(vh["kernel"], np.float64), np.asarray(vh["bias"], np.float64)
    values = (hidden[:, t - 1:t - 1 + N] @ kernel + bias)[..., 0]
    return logp, entropy, values, logits[:, t - 1:t - 1 + N]


def _ours(module, params, c, temperature, use_lora=True):
    batch = {"input_ids": jnp.asarray(c["ids"]), "attention_mask": jnp.asarray(c["mask"]),
             "pixel_values": jnp.asarray(c["pixels"])}
    fn = jax.jit(lambda p, b, tk, m: policy.response_logprobs(module, p, b, tk, m, temperature=temperature,
                                                                use_lora=use_lora, entropy=True))
    out = fn(params, batch, jnp.asarray(c["tokens"], jnp.int32), jnp.asarray(c["resp_mask"], jnp.int32))
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _max_err(ours, ref, real):
    return float(np.abs(ours - ref)[real].max())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_matches_transformers_with_merged_adapters(case, temperature):
    c = case
    ref_logp, ref_ent, ref_val, ref_logits = _reference(c, temperature)
    real = c["resp_mask"].astype(bool)

    # The logits themselves (the model's forward at the response positions), as in the
    # parity tests: 1e-4 in float32 (measured 2.4e-7).
    t = c["ids"].shape[1]
    full_ids = np.concatenate([c["ids"], c["tokens"]], axis=1)
    full_mask = np.concatenate([c["mask"], c["resp_mask"]], axis=1)
    logits = np.asarray(c["module"].apply({"params": c["params"]}, jnp.asarray(full_ids), jnp.asarray(c["pixels"]),
                                          jnp.asarray(full_mask)))[:, t - 1:t - 1 + N]
    assert _max_err(logits, ref_logits, real) <= 1e-4

    ours = _ours(c["module"], c["params"], c, temperature)
    # float32 against float64 NumPy on float32 torch logits; measured 6e-7 (log-probs),
    # 1.0e-6 (entropy), 1.6e-6 (values)
    assert _max_err(ours["logprobs"], ref_logp, real) <= 1e-5
    assert _max_err(ours["entropy"], ref_ent, real) <= 1e-5
    assert _max_err(ours["values"], ref_val, real) <= 1e-5
    # padding positions are exactly 0
    for k in ("logprobs", "values", "entropy"):
        assert (ours[k][~real] == 0).all(), k
    # the compared numbers are not trivial: values O(1), log-probs of a ~100-token vocabulary
    assert np.abs(ref_val[real]).min() > 1e-3 and np.abs(ref_val[real]).max() > 0.1
    assert ref_logp[real].max() < -1.0 and ref_ent[real].min() > 1.0


def test_adapters_and_value_head_matter(case):
    """Without the adapters the log-probs are far from the merged reference: the comparison
    above sees the LoRA path (and the value head is the perturbed one, not zero)."""
    c = case
    ref_logp, _, ref_val, _ = _reference(c, 1.0)
    real = c["resp_mask"].astype(bool)
    base = _ours(c["module"], c["params"], c, 1.0, use_lora=False)
    assert _max_err(base["logprobs"], ref_logp, real) > 1e-2
    assert np.abs(ref_val[real]).max() > 0.1


def test_bfloat16_close_to_float32_reference(case):
    """bf16 compute (base weights in bf16, adapters and value head float32) against the
    float32 transformers reference. Measured on a 2-core x86 CPU (XLA CPU): max |d logp|
    0.0037 nats, |d value| 0.024 (values up to 2.5), |d entropy| 5e-5 (the tiny random
    model's next-token distributions are close to uniform, where the entropy is flat in the
    logits). bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per operation,
    accumulated over the vision tower, projector and 2 decoder layers). The bounds are ~4-6x
    the measurement, for other backends' fusion and accumulation orders, and stay 10x below
    the 0.16 nats by which the adapters move the log-probs (checked last)."""
    c = case
    module16, params16 = hf_io.from_hf(c["root"], dtype=jnp.bfloat16, lora=LoRAConfig(rank=RANK, alpha=ALPHA),
                                       lora_key=jax.random.PRNGKey(0))
    # the same adapters and value head as the float32 model (float32 leaves), base weights in bf16
    params16 = jax.tree.map(lambda a, b: b.astype(a.dtype), params16, c["params"])
    assert params16["value_head"]["kernel"].dtype == jnp.float32
    assert params16["language_model"]["layers_0"]["mlp"]["up_proj"]["lora_b"].dtype == jnp.float32
    assert params16["language_model"]["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    ref_logp, ref_ent, ref_val, _ = _reference(c, 1.0)
    real = c["resp_mask"].astype(bool)
    ours = _ours(module16, params16, c, 1.0)
    errs = {k: _max_err(ours[k], ref, real)
            for k, ref in (("logprobs", ref_logp), ("entropy", ref_ent), ("values", ref_val))}
    assert errs["logprobs"] <= 0.015 and errs["entropy"] <= 3e-4 and errs["values"] <= 0.1, errs
    assert errs["logprobs"] > 0  # bf16 did run
    for k in ("logprobs", "values", "entropy"):
        assert (ours[k][~real] == 0).all(), k
    base = _ours(c["module"], c["params"], c, 1.0, use_lora=False)
    assert _max_err(base["logprobs"], ref_logp, real) > 10 * errs["logprobs"]
