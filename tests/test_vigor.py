"""ViGoR: refinement drops exactly the sentences holding rejected nouns (hand-written
expected texts), penalties, selection and thresholds against hand values, the SFT loss
against NumPy and its update against an SGD step on an independent gradient. The reduced
run on the synthetic world is in test_world_methods.py."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fisao_jax.data import synthetic
from fisao_jax.methods import sft, vigor
from fisao_jax.methods.csr_search import sentence_end_table
from fisao_jax.params import merge_params, split_params
from fisao_jax.policy import token_mean_nll
from fisao_jax.train_state import TrainState
from fisao_jax.rewards.entities_build import vocab_from_names
from fisao_jax.rewards.spans import build_span_table, find_entity_spans
from test_dpo import MODEL, tiny_llava, tiny_pairs



@pytest.fixture(scope="module")
def world_text(tmp_path_factory):
    from fisao_jax.data.tokenizer import train_tokenizer

    data = synthetic.make_dataset(synthetic.WorldConfig(), 200, seed=0, split="toy")
    tok = train_tokenizer(data["captions"], tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=400)
    vocab = vocab_from_names(synthetic.class_names(synthetic.WorldConfig()))
    return tok, vocab, build_span_table(tok, vocab), sentence_end_table(tok)


def refine_text(world_text, text, scores, threshold=20.0, eos=True):
    """Tokenize `text`, score its mentions with `scores` {surface form: score}, refine, decode."""
    tok, vocab, table, ends = world_text
    ids = tok(text)["input_ids"][1:] + ([tok.eos_token_id] if eos else [])
    pad = 64 - len(ids)  # one shape for every text: one compile of the span finder
    tokens, mask = np.asarray([ids + [0] * pad], np.int32), np.asarray([[1] * len(ids) + [0] * pad], np.int32)
    ent = np.asarray(find_entity_spans(tokens, mask, table))
    found = [vocab.surface_forms[e] for e in ent[ent >= 0]]
    s = np.zeros(ent.shape)
    s[ent >= 0] = [scores[f] for f in found]
    _, _, rejected = vigor.noun_penalties(s, ent, threshold)
    out = vigor.refine_tokens(tokens[0], mask[0], rejected[0], ends, tok.eos_token_id)
    if out is None:
        return None, found
    assert (out[-1] == tok.eos_token_id) == eos
    return tok.decode(out, skip_special_tokens=True).strip(), found


TEXT = "A red cup on the left. There is also a fork in the top right corner. A ball at the top."


def test_refinement_drops_exactly_the_sentences_with_rejected_nouns(world_text):
    ok = {"cup": 30.0, "fork": 25.0, "ball": 40.0, "forks": 21.0, "spoon": 50.0, "clock": 35.0}
    text, found = refine_text(world_text, TEXT, ok)
    assert found == ["cup", "fork", "ball"] and text == TEXT
    assert refine_text(world_text, TEXT, dict(ok, fork=10.0))[0] == "A red cup on the left. A ball at the top."
    assert refine_text(world_text, TEXT, dict(ok, fork=10.0, ball=19.9))[0] == "A red cup on the left."
    assert refine_text(world_text, TEXT, dict(ok, cup=-5.0))[0] == (
        "There is also a fork in the top right corner. A ball at the top.")
    assert refine_text(world_text, TEXT, dict(ok, cup=0.0, fork=0.0, ball=0.0))[0] is None
    # one rejected noun takes its whole sentence, accepted nouns in it included
    two = "A spoon and two forks on the right. A clock."
    assert refine_text(world_text, two, dict(ok, forks=3.0))[0] == "A clock."
    assert refine_text(world_text, two, dict(ok, spoon=3.0))[0] == "A clock."
    # a response cut by the token limit: the unfinished sentence is a sentence, no EOS is added
    cut = "A red cup on the left. There is also a fork in the"
    assert refine_text(world_text, cut, ok, eos=False)[0] == cut
    assert refine_text(world_text, cut, dict(ok, fork=1.0), eos=False)[0] == "A red cup on the left."
    # text after the last period without one is a sentence too
    assert refine_text(world_text, "A cup. A fork", dict(ok, cup=1.0))[0] == "A fork"


def test_penalties_selection_and_thresholds():
    ent = np.array([[3, -1, 5, 7], [-1, -1, -1, -1], [2, 2, -1, -1]])
    scores = np.array([[10.0, 99.0, 30.0, 19.0], [0.0, 0.0, 0.0, 0.0], [25.0, 20.0, 0.0, 0.0]])
    penalty, positive, rejected = vigor.noun_penalties(scores, ent, 20.0)
    np.testing.assert_array_equal(penalty, [2, 0, 0])
    np.testing.assert_array_equal(positive, [1, 0, 2])  # 20.0 is not below the threshold: accepted
    np.testing.assert_array_equal(rejected, [[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    penalty, positive, _ = vigor.noun_penalties(scores, ent, 20.0, "strength")
    np.testing.assert_allclose(penalty, [10.0 + 1.0, 0.0, 0.0])
    np.testing.assert_allclose(positive, [10.0, 0.0, 5.0])
    with pytest.raises(ValueError, match="vigor.penalty"):
        vigor.noun_penalties(scores, ent, 20.0, "max")

    pen = np.array([[1, 0, 0, 2], [0, 0, 1, 1], [3, 2, 2, 5]])
    pos = np.array([[3, 1, 2, 0], [0, 0, 5, 5], [9, 1, 4, 0]])
    # fewest rejected; then most accepted; then the earliest sample
    np.testing.assert_array_equal(vigor.select_samples(pen, pos), [2, 0, 2])

    base = types.SimpleNamespace(s_c=60.0, s_h=20.0)
    assert vigor.rejection_threshold(base, "midpoint") == 40.0
    assert vigor.rejection_threshold(base, "s_h") == 20.0 and vigor.rejection_threshold(base, "s_c") == 60.0
    assert vigor.rejection_threshold(base, "fixed", 12.5) == 12.5
    with pytest.raises(ValueError, match="vigor.threshold"):
        vigor.rejection_threshold(base, "median")


def test_sft_loss_is_the_token_mean_nll():
    rng = np.random.RandomState(0)
    logp = -rng.rand(3, 4)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    weight = np.array([1.0, 1.0, 0.0])
    loss, stats = token_mean_nll(jnp.asarray(logp), jnp.asarray(mask), jnp.asarray(weight))
    expect = -(logp[0, :3].sum() + logp[1, 0]) / 4
    np.testing.assert_allclose(float(loss), expect, rtol=1e-6)
    assert float(stats["sft/tokens"]) == 4.0


def test_sft_update_is_an_sgd_step_on_an_independent_gradient():
    _, params = tiny_llava(seed=8)
    p = tiny_pairs(seed=9)
    b = {"input_ids": p["input_ids"], "attention_mask": p["attention_mask"], "pixel_values": p["pixel_values"],
         "tokens": p["chosen_tokens"], "mask": p["chosen_mask"], "weight": np.array([1.0, 0.0, 1.0, 1.0], np.float32)}
    b = {k: jnp.asarray(v) for k, v in b.items()}
    lr = 0.1
    trainable, frozen = split_params(params)
    state = TrainState(trainable, optax.sgd(lr).init(trainable), jnp.zeros((), jnp.int32))
    new, metrics = state.apply(jax.jit(sft.make_sft_update(MODEL, optax.sgd(lr))), frozen, b, jax.random.PRNGKey(0))
    assert bool(metrics["finite"]) and int(new.step) == 1

    def reference(trainable):
        t = b["input_ids"].shape[1]
        ids = jnp.concatenate([b["input_ids"], b["tokens"]], 1)
        mask = jnp.concatenate([b["attention_mask"], b["mask"]], 1)
        logits = MODEL.apply({"params": merge_params(trainable, frozen)}, ids, b["pixel_values"], mask)
        logp = jax.nn.log_softmax(logits[:, t - 1:-1], -1)
        nll = -jnp.take_along_axis(logp, b["tokens"][..., None], -1)[..., 0]
        m = b["mask"] * b["weight"][:, None]
        return jnp.sum(nll * m) / jnp.sum(m)

    grad = jax.jit(jax.grad(reference))(state.trainable)
    for got, g, old in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(grad), jax.tree.leaves(state.trainable)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(old - lr * g), rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)) > 1e-3
