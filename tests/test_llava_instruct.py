"""LLaVA-1.5 prompt template and token batches equal transformers' LlavaProcessor output."""
import io
import json

import numpy as np
import PIL.Image
import pytest

from fisao_jax.data import prompts

transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

# llava-hf/llava-1.5-7b-hf chat template as published with the checkpoint.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is shown in this image? ASSISTANT: A dog and a cat sit on a sofa.",
    "Please describe this image in detail.",
    "There is a red bus next to a tall building, and 3 people wait at the stop.",
    "How many people are in the picture?\nTwo people are standing near the kitchen table.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny LLaMA-style sentencepiece tokenizer with `<image>` and `<pad>` added, like llava-hf's."""
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    tok.padding_side = "left"
    return tok


def hf_processor(tokenizer, crop):
    image_processor = transformers.LlavaImageProcessorPil(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, do_pad=True)
    return transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_HF_CHAT_TEMPLATE)


def test_vicuna_v1_text_by_hand():
    assert prompts.format_prompt("What is this?") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat is this? ASSISTANT:")
    # LLaVA moves a trailing or inline placeholder to the front and strips whitespace.
    assert prompts.format_prompt("What is this?\n<image>", system=None) == "USER: <image>\nWhat is this? ASSISTANT:"
    assert prompts.format_prompt("  Describe <image> it. ", system=None, with_image=False) == \
        "USER: Describe  it. ASSISTANT:"


@pytest.mark.parametrize("system", [prompts.VICUNA_V1_SYSTEM, None])
def test_format_matches_llava_hf_chat_template(tokenizer, system):
    processor = hf_processor(tokenizer, crop=28)
    for question in ["What is shown in this image?", "Please describe this image in detail.", "How many?\nCount."]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        expected = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert prompts.format_prompt(question, system=system) == expected


@pytest.mark.parametrize("crop,num_image_tokens", [(28, 4), (336, 576)])
def test_encode_matches_llava_processor(tokenizer, crop, num_image_tokens):
    questions = ["What is shown in this image?", "Please describe this image in detail.",
                 "There is a red bus next to a tall building. How many people wait at the stop?"]
    texts = [prompts.format_prompt(q) for q in questions] + [prompts.format_prompt("Hi", system=None)]
    images = [PIL.Image.new("RGB", (40 + 10 * i, 30), (i * 50, 90, 20)) for i in range(len(texts))]
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    ids, mask = prompts.encode_prompts(tokenizer, texts, image_token_id, num_image_tokens, max_len=None)
    max_len = ids.shape[1] + 3
    expected = hf_processor(tokenizer, crop)(images=images, text=texts, padding="max_length", max_length=max_len,
                                             return_tensors="np")
    ids, mask = prompts.encode_prompts(tokenizer, texts, image_token_id, num_image_tokens, max_len=max_len)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (len(texts), max_len)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert (ids == image_token_id).sum(axis=1).tolist() == [num_image_tokens] * len(texts)
    assert (ids[:, -1] != tokenizer.pad_token_id).all()  # left padded: every row ends in real tokens


def test_encode_errors(tokenizer):
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = prompts.format_prompt("Please describe this image in detail.")
    with pytest.raises(ValueError, match=r"prompt 1 is \d+ tokens .* longer than max_len=20"):
        prompts.encode_prompts(tokenizer, ["<image>", text], image_token_id, 4, max_len=20)
    with pytest.raises(ValueError, match="prompt 0: 1 '<image>' placeholder.* 0 token"):
        prompts.encode_prompts(tokenizer, [text], image_token_id + 1000, 4)
    with pytest.raises(ValueError, match="num_image_tokens"):
        prompts.encode_prompts(tokenizer, [text], image_token_id, 0)


# ---------------------------------------------------------------------------------------
# LLaVA-Instruct reader and batches
# ---------------------------------------------------------------------------------------
import gzip  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

from fisao_jax.data import llava_instruct as li  # noqa: E402


def jpeg(path, colour=(10, 200, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (8, 6), colour).save(path)


def conversation(entry_id, image, question, answer="An answer."):
    entry = {"id": entry_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        entry["image"] = image
    return entry


@pytest.fixture()
def coco(tmp_path):
    """COCO folder: a 2017 train image, a 2014-named one, one at the root, one broken file."""
    root = tmp_path / "coco"
    jpeg(root / "train2017" / "000000000001.jpg")
    jpeg(root / "train2014" / "COCO_train2014_000000000002.jpg")
    jpeg(root / "loose.png")
    (root / "train2017").mkdir(exist_ok=True)
    (root / "train2017" / "000000000005.jpg").write_text("not a jpeg")
    return root


ENTRIES = [
    conversation("000000000001", "000000000001.jpg", "<image>\nWhat is in the picture?"),
    conversation("2", "000000000002.jpg", "How many dogs are there?\n<image>"),  # 2017 name, 2014 file
    conversation("3", "loose.png", "<image>\nDescribe it."),
    conversation("4", None, "A text-only question?"),                             # no image
    conversation("5", "000000000005.jpg", "<image>\nUnreadable?"),               # not an image
    conversation("6", "000000000006.jpg", "<image>\nMissing?"),                  # no such file
    conversation("7", "000000000001.jpg", "  <image>\n  "),                      # empty turn
    {"id": "8", "image": "000000000001.jpg", "conversations": "oops"},            # malformed
    conversation("9", "000000000001.jpg", "Last one <image> inline."),
    conversation("10", "000000000001.jpg", "Beyond the limit."),
]


def test_reader_keeps_good_entries_and_counts_the_rest(tmp_path, coco):
    source = tmp_path / "llava_instruct.json"
    source.write_text(json.dumps(ENTRIES))
    records, report = li.load_llava_instruct(source, coco, limit=9, progress=False)
    assert [(r.id, r.prompt) for r in records] == [
        ("000000000001", "What is in the picture?"), ("2", "How many dogs are there?"), ("3", "Describe it."),
        ("9", "Last one  inline.")]
    assert [r.image_path for r in records] == [
        str(coco / "train2017" / "000000000001.jpg"), str(coco / "train2014" / "COCO_train2014_000000000002.jpg"),
        str(coco / "loose.png"), str(coco / "train2017" / "000000000001.jpg")]
    assert (report.read, report.kept, report.num_skipped) == (9, 4, 5)
    assert report.skipped == {"malformed": 1, "no_image": 1, "empty_turn": 1, "missing_image": 1,
                              "unreadable_image": 1}
    text = report.summary()
    assert "read 9, kept 4, skipped 5" in text and "entry 5 (id 6)" in text and "000000000006.jpg" in text
    # 'exists' does not open files, so the broken one passes.
    records, report = li.load_llava_instruct(source, coco, limit=9, check_images="exists", progress=False)
    assert [r.id for r in records] == ["000000000001", "2", "3", "5", "9"]


def test_reader_raise_mode_names_source_entry_and_id(tmp_path, coco):
    source = tmp_path / "llava_instruct.json"
    source.write_text(json.dumps(ENTRIES))
    with pytest.raises(li.InstructDataError, match=r"llava_instruct.json entry 3 \(id 4\): no 'image'"):
        li.load_llava_instruct(source, coco, on_error="raise", progress=False)
    records, _ = li.load_llava_instruct(source, coco, limit=3, on_error="raise", progress=False)
    assert len(records) == 3


def test_reader_jsonl_gzip_and_bad_files(tmp_path, coco):
    source = tmp_path / "convs.jsonl.gz"
    with gzip.open(source, "wt") as f:
        f.write("\n".join(json.dumps(e) for e in ENTRIES[:3]) + "\n\n")
    records, _ = li.load_llava_instruct(source, coco, progress=False)
    assert [r.id for r in records] == ["000000000001", "2", "3"]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "1",\n "image": }]')
    with pytest.raises(ValueError, match=r"broken.json: invalid JSON at line 2"):
        li.load_llava_instruct(broken, coco, progress=False)
    broken.write_text('{"id": "1"}')
    with pytest.raises(ValueError, match="broken.json: expected a JSON list"):
        li.load_llava_instruct(broken, coco, progress=False)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        li.load_llava_instruct(tmp_path / "nothing.json", coco, progress=False)
    with pytest.raises(FileNotFoundError, match="COCO image folder not found"):
        li.load_llava_instruct(broken, tmp_path / "no_coco", progress=False)


def test_hf_datasets_source_is_optional(coco, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        li.load_llava_instruct("liuhaotian/LLaVA-Instruct-150K", coco, progress=False)
    calls = []

    def load_dataset(name, data_files=None, split=None, streaming=False):
        calls.append((name, data_files, split, streaming))
        return iter(ENTRIES)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    records, report = li.load_llava_instruct("liuhaotian/LLaVA-Instruct-150K", coco, limit=3,
                                             hf_data_files="llava_instruct_150k.json", progress=False)
    assert calls == [("liuhaotian/LLaVA-Instruct-150K", "llava_instruct_150k.json", "train", True)]
    assert [r.id for r in records] == ["000000000001", "2", "3"] and report.read == 3


def test_batches_cover_each_epoch_once_and_resume_exactly():
    records = list(range(10))
    stream = li.iterate_batches(records, batch_size=4, seed=3)
    batches = [next(stream) for _ in range(5)]  # 20 examples = 2 epochs exactly
    flat = [x for batch, _ in batches for x in batch]
    assert sorted(flat[:10]) == records and sorted(flat[10:]) == records
    assert flat[:10] != records and flat[:10] != flat[10:]  # shuffled, and differently per epoch
    assert [pos for _, pos in batches] == [4, 8, 12, 16, 20]
    # Resume from a saved position (mid-epoch, the batch crosses the epoch boundary).
    resumed = li.iterate_batches(records, batch_size=4, seed=3, position=8)
    assert [next(resumed) for _ in range(3)] == batches[2:]
    assert li.batch_at(records, 8, 4, seed=3) == batches[2]
    assert li.batch_at(records, 0, 4, seed=4)[0] != batches[0][0]
    assert li.batch_at(records, 8, 4, shuffle=False) == ([8, 9, 0, 1], 12)


def test_encode_batch_matches_llava_processor(tmp_path, coco, tokenizer):
    source = tmp_path / "llava_instruct.json"
    source.write_text(json.dumps(ENTRIES))
    records, _ = li.load_llava_instruct(source, coco, limit=3, progress=False)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    ours = li.encode_batch(records, tokenizer, image_token_id, 576, max_len=680)
    texts = ["A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             f"detailed, and polite answers to the human's questions. USER: <image>\n{q} ASSISTANT:"
             for q in ("What is in the picture?", "How many dogs are there?", "Describe it.")]
    images = [PIL.Image.open(r.image_path) for r in records]
    expected = hf_processor(tokenizer, crop=336)(images=images, text=texts, padding="max_length", max_length=680,
                                                 return_tensors="np")
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(ours[key], expected[key])
    np.testing.assert_allclose(ours["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
