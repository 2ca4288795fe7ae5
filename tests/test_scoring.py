"""One scoring step (`scoring.make_score_fn`) against a hand computation in NumPy.

The setting is built so that every number is known: a tiny LLaVA policy with random,
non-zero adapters and value head; a real tiny CLIP (transformers, saved and loaded) as the
verifier, whose entity text table is written by hand so that each mentioned entity gets a
chosen score 100 * cos against its row's image (the image embedding taken from
transformers); responses written piece by piece, so the entity spans are known by reading
them. The reference then follows the method's definitions step by step: the reward of SPEC
step 6 at each span end, the k1 KL penalty on every response token, GAE with the configured
gamma and lambda, whitening over the batch's real tokens (TRL's unbiased variance), and the
metrics' definitions (per-response sums averaged over the batch; span fractions).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fisao_jax import scoring
from fisao_jax.data.tokenizer import train_tokenizer
from fisao_jax.models import configs as C
from fisao_jax.models import hf_io
from fisao_jax.models.llava import LlavaModel
from fisao_jax.rewards import verifier as verifier_lib
from fisao_jax.rewards.entities_build import vocab_from_names
from fisao_jax.rewards.reward import RewardParams
from fisao_jax.rewards.spans import build_span_table

torch = pytest.importorskip("torch")
import hf_tiny  # noqa: E402

TEXTS = ["a dog and a hot dog.", "a kite and two cups on a table.", "a teddy bear next to a fork.",
         "the cat sat with a baseball bat.", "a baseball and a cat.", "there is a cup and a kite."] * 20
NAMES = ["dog", "hot dog", "kite", "cup", "teddy bear", "fork", "cat", "baseball", "baseball bat"]
N = 11  # the token budget

# Responses piece by piece (EOS written out), with each entity mention's (surface form,
# first token, last token) read off the pieces. Row 2 fills the budget without EOS, so its
# last mention, 'baseball' (maybe 'baseball bat' in the making), is not scored.
RESPONSES = [
    (["▁a", "▁", "hot", "▁dog", "▁and", "▁t", "wo", "▁cup", "s", ".", "</s>"],
     # the mention starts at 'hot', not at the bare '▁' before it; 'dog' lies inside 'hot
     # dog': not a span of its own
     [("hot dog", 2, 3), ("cups", 7, 8)]),
    (["▁a", "▁kite", "▁and", "▁a", "▁t", "e", "ddy", "▁be", "ar", ".", "</s>"],
     [("kite", 1, 1), ("teddy bear", 4, 8)]),
    (["▁the", "▁cat", "▁w", "ith", "▁a", "▁dog", "▁and", "▁a", "▁fo", "rk", "▁baseball"],
     [("cat", 1, 1), ("dog", 5, 5), ("fork", 8, 9)]),
    (["▁a", "▁cup", ".", "</s>"],
     [("cup", 1, 1)]),
]
# The chosen verifier score (100 * cos with the row's image) of each mention, and the
# reward parameters; together they visit every branch of SPEC step 6 (positive, negative,
# neutral, clipped at s_max and at s_min).
SCORES = {(0, "hot dog"): 25.0, (0, "cups"): -10.0, (1, "kite"): 40.0, (1, "teddy bear"): 2.0,
          (2, "cat"): -35.0, (2, "dog"): 12.0, (2, "fork"): -5.5, (3, "cup"): 5.0}
MARGIN, S_C, S_H, S_MIN, S_MAX = 10.0, 10.0, -5.0, -20.0, 30.0
KL_COEF, GAMMA, LAM = 0.1, 0.9, 0.8


def spec_reward(s):
    """SPEC step 6, written out."""
    s = min(max(s, S_MIN), S_MAX)
    if s >= S_C:
        return MARGIN * (s - S_MIN) / (S_MAX - S_MIN)
    if s <= S_H:
        return MARGIN * (s - S_MAX) / (S_MAX - S_MIN)
    return 0.0


def gae(rewards, values, lengths):
    adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            last = rewards[b, t] + GAMMA * next_value - values[b, t] + GAMMA * LAM * last
            adv[b, t], ret[b, t] = last, last + values[b, t]
    return adv, ret


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    tok = train_tokenizer(TEXTS, root / "tok", vocab_size=330)
    vocab = vocab_from_names(NAMES)

    # responses [B, N] from the pieces
    b = len(RESPONSES)
    tokens, mask = np.zeros((b, N), np.int32), np.zeros((b, N), np.int32)
    for i, (pieces, _) in enumerate(RESPONSES):
        ids = tok.convert_tokens_to_ids(pieces)
        assert tok.unk_token_id not in ids, pieces
        tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1
    tokens[mask == 0] = tok.pad_token_id

    # the policy: a tiny LLaVA over the tokenizer's vocabulary, non-zero adapters and value head
    cfg = C.LlavaConfig(
        vision=C.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14),
        text=C.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64),
        lora=C.LoRAConfig(rank=4, alpha=8.0), image_token_id=len(tok))
    model = LlavaModel(cfg)
    params = hf_io.init_params(cfg, jax.random.PRNGKey(0))
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 100))

    def perturb(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "lora_b" or names[0] == "value_head":
            return x + 0.5 * jax.random.normal(next(keys), x.shape)
        return x
    params = jax.tree_util.tree_map_with_path(perturb, params)

    # prompts: BOS, the image, 1-3 text tokens, left padded
    rng = np.random.RandomState(0)
    img = [cfg.image_token_id] * cfg.num_image_tokens
    t = 1 + len(img) + 3
    ids, pmask = np.full((b, t), tok.pad_token_id, np.int32), np.zeros((b, t), np.int32)
    for i in range(b):
        row = [tok.bos_token_id] + img + list(rng.randint(3, 300, 1 + i % 3))
        ids[i, t - len(row):], pmask[i, t - len(row):] = row, 1
    pixels = rng.randn(b, 3, 28, 28).astype(np.float32)

    # the verifier: a tiny transformers CLIP; image embeddings from transformers itself
    hf_clip = hf_tiny.save_clip(root / "clip", seed=0)
    clip_module, clip_params = hf_io.from_hf(root / "clip")
    with torch.no_grad():
        emb = hf_clip.get_image_features(pixel_values=torch.tensor(pixels))
    emb = getattr(emb, "pooler_output", emb).numpy().astype(np.float64)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    # the text table: random unit rows, then each mentioned entity's row set so that its cos
    # with its row's image is the chosen score / 100 (every mention is of a different form)
    table = rng.randn(len(vocab), emb.shape[1])
    table /= np.linalg.norm(table, axis=-1, keepdims=True)
    for (row, form), score in SCORES.items():
        c = score / 100.0
        u = table[vocab.entity_id(form)] - (table[vocab.entity_id(form)] @ emb[row]) * emb[row]
        table[vocab.entity_id(form)] = c * emb[row] + np.sqrt(1 - c * c) * u / np.linalg.norm(u)
    vstate = verifier_lib.VerifierState(clip_params, jnp.asarray(table, jnp.float32), build_span_table(tok, vocab))
    verifier = verifier_lib.Verifier(clip_module, tok, eos_token_id=tok.eos_token_id)

    settings = scoring.ScoreSettings(kind="token", kl_coef=KL_COEF, gamma=GAMMA, lam=LAM, whiten_advantages=True)
    score = jax.jit(scoring.make_score_fn(model, verifier, settings))
    rp = RewardParams.create(MARGIN, S_C, S_H, S_MIN, S_MAX)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(pmask), "pixel_values": jnp.asarray(pixels)}
    out = jax.device_get(score(params, vstate, rp, batch, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(0)))

    # reference log-probs and values: full forward passes (LoRA on / off), log-softmax in NumPy
    full_ids = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([pmask, mask], axis=1)
    ref = {}
    for use_lora in (True, False):
        fwd = model.apply({"params": params}, jnp.asarray(full_ids), jnp.asarray(pixels), jnp.asarray(full_mask),
                          use_lora=use_lora)
        logsm = log_softmax(np.asarray(fwd, np.float64)[:, t - 1:t - 1 + N])
        ref[use_lora] = np.take_along_axis(logsm, tokens[..., None], axis=-1)[..., 0] * mask
    feats = model.apply({"params": params}, jnp.asarray(pixels), method=model.image_features)
    values = np.asarray(model.apply({"params": params}, jnp.asarray(full_ids), feats, jnp.asarray(full_mask),
                                    method=model.forward)["values"], np.float64)[:, t - 1:t - 1 + N] * mask
    return dict(out=out, vocab=vocab, tokens=tokens, mask=mask, logp=ref[True], ref_logp=ref[False], values=values)


def _expected_spans(vocab):
    """Entity ids, span starts and scores [B, N] read off RESPONSES and SCORES."""
    b = len(RESPONSES)
    ids, starts, scores = np.full((b, N), -1), np.full((b, N), -1), np.zeros((b, N))
    for row, (_, mentions) in enumerate(RESPONSES):
        for form, first, last in mentions:
            ids[row, last], starts[row, last], scores[row, last] = vocab.entity_id(form), first, SCORES[row, form]
    return ids, starts, scores


def test_spans_and_scores_by_hand(case):
    out, vocab = case["out"], case["vocab"]
    ids, starts, scores = _expected_spans(vocab)
    assert (ids >= 0).sum() == 8  # 8 scored mentions; 'baseball' at the cut is not one
    np.testing.assert_array_equal(out["entity_ids"], ids)
    np.testing.assert_array_equal(out["span_start"], starts)
    # 100 * cos in float32 from our CLIP vs the table built on transformers' image embedding
    np.testing.assert_allclose(out["token_scores"], scores, atol=1e-3)


def test_rewards_advantages_and_metrics_by_hand(case):
    out, vocab, mask = case["out"], case["vocab"], case["mask"]
    real = mask > 0
    lengths = mask.sum(1)
    ids, _, _ = _expected_spans(vocab)

    # policy / reference log-probs and values: the teacher-forced passes the step starts from
    np.testing.assert_allclose(out["old_logp"], case["logp"], atol=1e-5)
    np.testing.assert_allclose(out["ref_logp"], case["ref_logp"], atol=1e-5)
    np.testing.assert_allclose(out["old_values"], case["values"], atol=1e-5)
    kl_tokens = (case["logp"] - case["ref_logp"]) * real
    assert np.abs(kl_tokens).max() > 0.05  # the adapters matter: the KL penalty is not zero

    # SPEC step 6 at each span end; the k1 penalty on every response token
    task = np.zeros(mask.shape)
    for row, (_, mentions) in enumerate(RESPONSES):
        for form, _, last in mentions:
            task[row, last] = spec_reward(SCORES[row, form])
    assert sorted(task[ids >= 0]) == pytest.approx(sorted([9.0, -8.0, 10.0, 0.0, -10.0, 6.4, -7.1, 0.0]))
    np.testing.assert_allclose(out["task_rewards"], task, atol=1e-4)
    total = task - KL_COEF * kl_tokens
    np.testing.assert_allclose(out["rewards"], total, atol=1e-4)

    # GAE with the configured gamma and lambda; whitening over all real tokens of the batch
    adv, returns = gae(total, case["values"], lengths)
    flat = adv[real]
    whitened = np.where(real, (adv - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8), 0.0)
    np.testing.assert_allclose(out["returns"], returns, atol=1e-4)
    np.testing.assert_allclose(out["advantages"], whitened, atol=1e-4)
    for k in ("old_logp", "ref_logp", "old_values", "rewards", "advantages", "returns"):
        assert (out[k][~real] == 0).all(), k

    m = out["metrics"]
    kl_per_response = kl_tokens.sum(1)
    scores_per_response = task.sum(1)
    assert float(m["objective/kl"]) == pytest.approx(kl_per_response.mean(), abs=1e-5)
    assert float(m["objective/scores"]) == pytest.approx(scores_per_response.mean(), abs=1e-4)
    assert float(m["objective/non_score_reward"]) == pytest.approx(-KL_COEF * kl_per_response.mean(), abs=1e-5)
    assert float(m["objective/rlhf_reward"]) == pytest.approx(
        (scores_per_response - KL_COEF * kl_per_response).mean(), abs=1e-4)
    assert float(m["objective/entropy"]) == pytest.approx(-case["logp"].sum(1).mean(), abs=1e-4)
    assert float(m["tokens/responses_len_mean"]) == pytest.approx(lengths.mean())
    # spans: hot dog, kite (clipped), dog positive; cups, cat (clipped), fork negative;
    # teddy bear, cup neutral
    assert float(m["spans/count"]) == 8
    assert float(m["spans/frac_positive"]) == pytest.approx(3 / 8)
    assert float(m["spans/frac_negative"]) == pytest.approx(3 / 8)
    assert float(m["spans/frac_neutral"]) == pytest.approx(2 / 8)
    assert float(m["spans/mean_reward"]) == pytest.approx((9 - 8 + 10 + 0 - 10 + 6.4 - 7.1 + 0) / 8, abs=1e-4)
    assert float(m["spans/mean_score"]) == pytest.approx((25 - 10 + 40 + 2 - 35 + 12 - 5.5 + 5) / 8, abs=1e-3)
