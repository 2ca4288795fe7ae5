"""CSR: the calibrated sentence reward against hand-computed values, beam selection and the
sentence-level beam search on a model with a known distribution (a scripted one), the
jitted sentence sampler against a full forward of a tiny LLaVA. The reduced run on the
synthetic world is in test_world_methods.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fisao_jax.methods import csr_search as csr
from fisao_jax.methods.csr_search import Candidate, Continuation
from fisao_jax.models.llava import LlavaModel
from fisao_jax.rollout import SamplingConfig
from test_dpo import TINY, tiny_llava



def test_calibrated_reward_hand_values():
    clip = [25.0, -3.0, 0.0, 40.0]
    logp = np.log([[0.5, 0.8, 1.0], [0.9, 1.0, 1.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]])
    reward, r_i, r_t = csr.calibrated_reward(clip, logp, mask, 0.9, 0.1)
    # R = 0.9 * max(score, 0) + 0.1 * prod(p): 22.5 + 0.04 | 0 + 0.09 | 0 + 0.1 (empty product) | 36 + 0.0125
    np.testing.assert_allclose(np.asarray(reward), [22.54, 0.09, 0.1, 36.0125], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r_i), [25.0, 0.0, 0.0, 40.0])
    np.testing.assert_allclose(np.asarray(r_t), [0.4, 0.9, 1.0, 0.125], rtol=1e-6)
    reward, _, _ = csr.calibrated_reward(clip, logp, mask, 0.5, 0.5)
    np.testing.assert_allclose(np.asarray(reward), [12.7, 0.45, 0.5, 20.0625], rtol=1e-6)


def test_select_beams_keeps_top_and_bottom():
    scores = [3.0, 9.0, 1.0, 7.0, 5.0, 9.0]
    np.testing.assert_array_equal(csr.select_beams(scores, 2), [1, 5, 0, 2])
    np.testing.assert_array_equal(csr.select_beams(scores, 1), [1, 2])
    np.testing.assert_array_equal(csr.select_beams([2.0, 4.0, 3.0], 2), [1, 2, 0])  # <= 2k: all, best first
    assert csr.select_beams([], 2).size == 0


EOS, DOT = 2, 99
# A scripted model: the continuations of each prefix (tried in this order by the rows that
# continue it) and their sentence rewards. (2,) alone is "stop here".
SCRIPT = {
    (): [((10, DOT), 5.0), ((11, DOT), 1.0), ((12, DOT), 3.0)],
    (10, DOT): [((20, DOT), 2.0), ((EOS,), 0.0)],
    (11, DOT): [((21, DOT, EOS), 0.5), ((22, DOT), 6.0)],
    (10, DOT, 20, DOT): [((30, DOT, EOS), 1.0), ((31, DOT), 0.0)],
    (11, DOT, 22, DOT): [((EOS,), 0.0), ((32, DOT, EOS), 3.0)],
}
SECOND_PROMPT = [((EOS,), 0.0)]  # answers nothing


def scripted_search(kind, max_new_tokens=64, max_sentences=3):
    asked = []

    def sample_fn(rows):
        counts, out = {}, []
        for row in rows:
            if row is None:
                out.append(None)
                continue
            p, parent = row
            asked.append((p, parent.tokens))
            options = SCRIPT[parent.tokens] if p == 0 else SECOND_PROMPT
            k = counts.get((p, parent.tokens), 0)
            counts[(p, parent.tokens)] = k + 1
            tokens, _ = options[k % len(options)]
            out.append(Continuation(tokens, [0.0] * len(tokens), tokens[-1] == EOS))
        return out

    def score_fn(rows, conts):
        rewards = []
        for row, c in zip(rows, conts):
            options = {} if row is None else dict(SCRIPT.get(row[1].tokens, []) if row[0] == 0 else SECOND_PROMPT)
            rewards.append(0.0 if c is None else options[tuple(c.tokens)])
        return np.asarray(rewards), np.asarray(rewards)

    finals = csr.sentence_beam_search(sample_fn, score_fn, 2, keep=1, num_candidates=2, max_sentences=max_sentences,
                                      max_new_tokens=max_new_tokens, eos_token_id=EOS, response_kind=kind)
    return finals, asked


def test_beam_search_keeps_the_top_and_bottom_sentences():
    finals, asked = scripted_search("sum")
    # step 0: A (5), B (1), C (3) -> beams A (top) and B (bottom); C is never continued
    assert {t for p, t in asked if p == 0} == {(), (10, DOT), (11, DOT), (10, DOT, 20, DOT), (11, DOT, 22, DOT)}
    got = {c.tokens: c.rewards for c in finals[0]}
    assert got == {
        (10, DOT, EOS): (5.0,),                                   # A, then stop: no new sentence
        (11, DOT, 21, DOT, EOS): (1.0, 0.5),
        (10, DOT, 20, DOT, 30, DOT, EOS): (5.0, 2.0, 1.0),
        (10, DOT, 20, DOT, 31, DOT): (5.0, 2.0, 0.0),             # still open after the last step
        (11, DOT, 22, DOT, EOS): (1.0, 6.0),
        (11, DOT, 22, DOT, 32, DOT, EOS): (1.0, 6.0, 3.0),
    }
    assert all(c.final for c in finals[0])
    chosen, rejected = csr.preference_pair(finals[0], "sum")
    assert chosen.tokens == (11, DOT, 22, DOT, 32, DOT, EOS) and rejected.tokens == (11, DOT, 21, DOT, EOS)
    # by mean sentence reward: A alone (5) beats B, B2 (3.5); B, B1 (0.75) is the worst
    mean_finals, _ = scripted_search("mean")
    chosen, rejected = csr.preference_pair(mean_finals[0], "mean")
    assert chosen.tokens == (10, DOT, EOS) and rejected.tokens == (11, DOT, 21, DOT, EOS)
    # the second prompt stops at once: one final, no pair
    assert [c.tokens for c in finals[1]] == [(EOS,)] and csr.preference_pair(finals[1]) is None


def test_beam_search_token_budget_ends_responses():
    finals, _ = scripted_search("sum", max_new_tokens=4)
    got = {c.tokens for c in finals[0]}
    # A + A1 and B + B2 reach 4 tokens after two sentences and end there
    assert (10, DOT, 20, DOT) in got and (11, DOT, 22, DOT) in got
    assert all(len(t) <= 5 for t in got)


class _Pieces:
    """The bits of a tokenizer that `sentence_end_table` reads."""

    def __init__(self, pieces, special):
        self.pieces, self.all_special_ids = pieces, special

    def __len__(self):
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]


def test_sentence_end_table():
    pieces = ["<unk>", "<s>", "</s>", "▁a", ".", "▁corner.", "▁...", "▁.▁", "3.5x", "<image>"]
    tok = _Pieces(pieces, [0, 1, 2, 9])
    table = csr.sentence_end_table(tok, vocab_size=12)
    np.testing.assert_array_equal(np.flatnonzero(table), [4, 5, 6, 7])
    assert table.shape == (12,)
    with pytest.raises(ValueError, match="no token ends with"):
        csr.sentence_end_table(_Pieces(["<s>", "▁a"], [0]))


def _full_logprobs(model, params, ids, mask, pixels):
    logits = jax.jit(lambda p, i, x, m: model.apply({"params": p}, i, x, m))(params, ids, pixels, mask)
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))


def test_sentence_sampler_stops_at_sentence_ends_and_reports_model_logprobs():
    model, params = tiny_llava(seed=3)
    rng = np.random.RandomState(0)
    n_img, s = TINY.num_image_tokens, 6
    prompts = [[1] + [TINY.image_token_id] * n_img + [7, 8], [1] + [TINY.image_token_id] * n_img + [9]]
    t = max(map(len, prompts))
    p_ids, p_mask = np.zeros((2, t), np.int32), np.zeros((2, t), np.int32)
    for i, r in enumerate(prompts):
        p_ids[i, t - len(r):], p_mask[i, t - len(r):] = r, 1
    pixels = rng.randn(2, 3, 28, 28).astype(np.float32)
    stop = np.zeros(TINY.text.vocab_size, bool)
    stop[[5, 6, 11, 12, 13, 14, 15, 16]] = True
    prefixes = [(), (20, 21), (22,), (), (23,), (24, 25, 26), (), (27,)]
    rows = [(i % 2, Candidate(pf)) for i, pf in enumerate(prefixes)]
    budget = np.array([0, 1, 3, 9, 9, 9, 9, 9], np.int32)
    max_new = 12
    ids, mask, image, which = csr.pack_prefixes(p_ids, p_mask, rows, t + max_new, pad_id=0,
                                                image_token_id=TINY.image_token_id)
    np.testing.assert_array_equal(image.sum(1), [n_img] * len(rows))
    np.testing.assert_array_equal(image, ids == TINY.image_token_id)
    feats = jax.jit(lambda p, x: model.apply({"params": p}, x, method=LlavaModel.image_features))(params, pixels)
    sampler = csr.make_sentence_sampler(model, SamplingConfig(eos_token_id=EOS, pad_token_id=0), s)
    out = sampler(params, ids, mask, image, which, feats, jnp.asarray(stop), budget, jax.random.PRNGKey(4))
    toks, m, lp, eos = (np.asarray(x) for x in out)
    # teacher-forced reference, one full forward: the original left-padded prompt, then
    # prefix + sampled tokens, right-padded
    full_ids, full_mask = np.zeros((len(rows), t + max_new), np.int32), np.zeros((len(rows), t + max_new), np.int32)
    for r, (p, cand) in enumerate(rows):
        cont = list(cand.tokens) + toks[r, :int(m[r].sum())].tolist()
        full_ids[r, :t + len(cont)] = np.concatenate([p_ids[p], cont])
        full_mask[r, :t + len(cont)] = np.concatenate([p_mask[p], np.ones(len(cont), np.int32)])
    ref = _full_logprobs(model, params, full_ids, full_mask, pixels[[p for p, _ in rows]])
    ended_by_stop = ran_to_limit = 0
    for r, (p, cand) in enumerate(rows):
        n = int(m[r].sum())
        assert (m[r, :n] == 1).all() and (m[r, n:] == 0).all()
        assert n <= min(budget[r], s)
        new = toks[r, :n]
        is_end = stop[new] | (new == EOS)
        assert not is_end[:-1].any(), f"row {r} continued past a sentence end: {new}"
        if n and is_end[-1]:
            ended_by_stop += 1
        else:
            assert n == min(budget[r], s)
            ran_to_limit += n > 0
        assert bool(eos[r]) == (n > 0 and new[-1] == EOS)
        if n == 0:
            continue
        start = t + len(cand.tokens)
        expect = [ref[r, start - 1 + i, tok] for i, tok in enumerate(new)]
        np.testing.assert_allclose(lp[r, :n], expect, rtol=1e-4, atol=1e-4)
    assert ended_by_stop >= 1 and ran_to_limit >= 1
    assert m[0].sum() == 0 and m[1].sum() == 1
