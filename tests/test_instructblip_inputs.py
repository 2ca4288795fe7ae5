"""InstructBLIP image transform and prompt encoding against transformers' InstructBlipProcessor,
built offline from a tiny trained LLaMA tokenizer, a tiny BERT vocabulary and BlipImageProcessor."""
import dataclasses
import random

import numpy as np
import PIL.Image
import pytest

transformers = pytest.importorskip("transformers")

import hf_tiny  # noqa: E402
from fisao_jax.data import instructblip_inputs as I  # noqa: E402
from fisao_jax.data.image_config import ImageConfig  # noqa: E402
from fisao_jax.data.tokenizer import train_tokenizer  # noqa: E402

WORDS = "a cat sits on the table near two dogs and describe this image in detail what is unusual about".split()
PROMPTS = ["Describe this image in detail.", "What is unusual about the cats on the table?", "Two dogs"]
QUERIES = 3
SIZE = 32


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    root = tmp_path_factory.mktemp("ib_tok")
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))).capitalize() + "." for _ in range(200)]
    tok = train_tokenizer(corpus, root / "llama", vocab_size=320)
    qtok = hf_tiny.bert_tokenizer(root / "bert", WORDS)
    image_processor = transformers.BlipImageProcessor(size={"height": SIZE, "width": SIZE})
    proc = transformers.InstructBlipProcessor(image_processor=image_processor, tokenizer=tok,
                                              qformer_tokenizer=qtok, num_query_tokens=QUERIES)
    return tok, qtok, proc, root


def _images():
    rng = np.random.RandomState(0)
    rgba = rng.randint(0, 256, (37, 45, 4), np.uint8)
    rgba[..., 3] = rng.randint(0, 256, (37, 45))
    return [PIL.Image.fromarray(rng.randint(0, 256, (40, 71, 3), np.uint8)),
            PIL.Image.fromarray(rng.randint(0, 256, (90, 33, 3), np.uint8)),
            PIL.Image.fromarray(rgba)]


def test_processor_layout_equals_transformers(tools):
    tok, qtok, proc, _ = tools
    assert qtok.tokenize("describe the cats") == ["describe", "the", "cat", "##s"]  # a real WordPiece vocabulary
    ref = proc(images=_images(), text=PROMPTS, padding=True, return_tensors="np")
    image_id = tok.convert_tokens_to_ids("<image>")
    ours = I.encode_instructblip_prompts(tok, qtok, PROMPTS, image_id, QUERIES, layout="processor")
    for key in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
        assert ours[key].dtype == np.int32
    assert (ref["input_ids"][:, :QUERIES] == image_id).all()
    assert (ref["attention_mask"] == 0).any()  # the batch is padded
    np.testing.assert_array_equal(I.preprocess_images(_images(), SIZE), ref["pixel_values"])


def test_left_layout_holds_the_same_tokens_with_padding_first(tools):
    tok, qtok, proc, _ = tools
    image_id = tok.convert_tokens_to_ids("<image>")
    ref = I.encode_instructblip_prompts(tok, qtok, PROMPTS, image_id, QUERIES, layout="processor")
    ours = I.encode_instructblip_prompts(tok, qtok, PROMPTS, image_id, QUERIES)
    for r in range(len(PROMPTS)):
        real = ours["attention_mask"][r].astype(bool)
        np.testing.assert_array_equal(ours["input_ids"][r][real],
                                      ref["input_ids"][r][ref["attention_mask"][r].astype(bool)])
        n = int(real.sum())
        assert real[-n:].all() and not real[:-n].any()  # one block of padding, first
        assert (ours["input_ids"][r][~real] == tok.pad_token_id).all()
    np.testing.assert_array_equal(ours["qformer_input_ids"], ref["qformer_input_ids"])


def test_static_lengths_and_errors(tools):
    tok, qtok, _, _ = tools
    image_id = tok.convert_tokens_to_ids("<image>")
    out = I.encode_instructblip_prompts(tok, qtok, PROMPTS[:1], image_id, QUERIES, max_len=40, qformer_max_len=16,
                                        pad_id=7)
    assert out["input_ids"].shape == (1, 40) and out["qformer_input_ids"].shape == (1, 16)
    assert out["input_ids"][0, 0] == 7 and out["qformer_input_ids"][0, -1] == qtok.pad_token_id
    with pytest.raises(ValueError, match="prompt 1 is .* language-model tokens, longer than the limit 8"):
        I.encode_instructblip_prompts(tok, qtok, ["a", PROMPTS[1]], image_id, QUERIES, max_len=8)
    with pytest.raises(ValueError, match="prompt 0 is .* Q-Former tokens, longer than the limit 4"):
        I.encode_instructblip_prompts(tok, qtok, PROMPTS[:1], image_id, QUERIES, qformer_max_len=4)
    with pytest.raises(ValueError, match="prompt 0 encodes an image token"):
        I.encode_instructblip_prompts(tok, qtok, ["<image> a cat"], image_id, QUERIES)
    with pytest.raises(ValueError, match="layout must be one of"):
        I.encode_instructblip_prompts(tok, qtok, PROMPTS, image_id, QUERIES, layout="right")


def test_image_config_from_saved_blip_processor(tools):
    _, _, proc, root = tools
    proc.image_processor.save_pretrained(str(root / "ip"))
    cfg = ImageConfig.from_hf(root / "ip")
    assert not cfg.do_center_crop and not cfg.pad_to_square and cfg.output_shape == (3, SIZE, SIZE)
    # the crop size is unused without a centre crop
    assert dataclasses.replace(cfg, crop=(SIZE, SIZE)) == I.instructblip_image_config(SIZE)
