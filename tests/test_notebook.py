"""colab/fisao_tpu.ipynb: a valid nbformat-4 notebook whose install and download steps all sit
under `not TINY`, and whose code cells run end to end in TINY mode (tiny random models, fixture
COCO / LLaVA-Instruct / POPE files) with results checked against hand computations."""
import ast
import json
import pathlib
import re
import sys

import jax
import numpy as np
import PIL.Image
import pytest

import toy_world

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "fisao_tpu.ipynb"
# Calls that reach the network or change the environment: allowed only under `not TINY`.
NETWORK_CALLS = {"sh", "snapshot_download", "hf_hub_download", "urlretrieve", "urlopen", "upload_folder",
                 "create_repo", "system"}
CELL_KEYS = {"markdown": {"cell_type", "id", "metadata", "source"},
             "code": {"cell_type", "id", "metadata", "source", "outputs", "execution_count"}}


def _load():
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def _source(cell) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def _is_parameters(cell) -> bool:
    return "parameters" in cell["metadata"].get("tags", [])


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _not_tiny(test) -> bool:
    """`not TINY`, alone or as one operand of an `and`."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return isinstance(test.operand, ast.Name) and test.operand.id == "TINY"
    return isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) and any(_not_tiny(v) for v in test.values)


def unguarded_network_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every NETWORK_CALLS call outside `if not TINY:` (or the else of `if TINY:`)."""
    found = []

    def visit(node, guarded):
        if isinstance(node, ast.If):
            visit(node.test, guarded)
            is_tiny = isinstance(node.test, ast.Name) and node.test.id == "TINY"
            for child in node.body:
                visit(child, guarded or _not_tiny(node.test))
            for child in node.orelse:
                visit(child, guarded or is_tiny)
            return
        if isinstance(node, ast.Call) and _call_name(node) in NETWORK_CALLS and not guarded:
            found.append((node.lineno, _call_name(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def test_guard_checker_tells_guarded_from_unguarded():
    src = ("snapshot_download('a')\n"
           "if not TINY:\n    sh('pip')\n"
           "if TINY:\n    print()\nelse:\n    urlretrieve('u', 'p')\n"
           "if HF_REPO_ID and not TINY:\n    api.upload_folder()\n"
           "if TINY or x:\n    hf_hub_download('b')\n"
           "def f():\n    sh('git')\n")
    assert unguarded_network_calls(ast.parse(src)) == [(1, "snapshot_download"), (11, "hf_hub_download"), (13, "sh")]


def test_notebook_is_valid_nbformat4():
    text = NOTEBOOK.read_text(encoding="utf-8")
    nb = json.loads(text)
    assert set(nb) == {"cells", "metadata", "nbformat", "nbformat_minor"}
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5  # 4.5: cells carry ids
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)
    for cell in nb["cells"]:
        assert set(cell) == CELL_KEYS[cell["cell_type"]], cell["id"]
        assert isinstance(cell["metadata"], dict)
        src = cell["source"]
        assert isinstance(src, str) or (isinstance(src, list) and all(isinstance(s, str) for s in src))
        if isinstance(src, list):  # Jupyter's line format: every line but the last ends with a newline
            assert all(s.endswith("\n") for s in src[:-1]) and not src[-1].endswith("\n"), cell["id"]
        assert _source(cell).strip(), f"empty cell {cell['id']}"
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{cell['id']} saved with outputs"
    try:
        import nbformat
    except ImportError:
        return
    nbformat.validate(nbformat.reads(text, as_version=4))


def test_every_step_is_explained_and_plain_python():
    cells = _load()["cells"]
    assert cells[0]["cell_type"] == "markdown"
    for before, cell in zip(cells, cells[1:]):
        if cell["cell_type"] == "code":
            assert before["cell_type"] == "markdown", f"code cell {cell['id']} has no explanation before it"
    for cell in cells:
        if cell["cell_type"] == "code":
            src = _source(cell)
            assert not re.search(r"^\s*[!%]", src, re.M), f"shell/magic line in {cell['id']}: runs only in IPython"
            ast.parse(src, filename=cell["id"])
    text = "".join(_source(c) for c in cells)
    for needed in ("llava-hf/llava-1.5-7b-hf", "openai/clip-vit-large-patch14-336", "configs/llava7b.py",
                   "load_entity_vocab", "tools/build_entities.py", "train(config, RUN)", "chair_scores",
                   "pope_scores", "export_llava", "apply_adapter"):
        assert needed in text, needed


def test_parameters_cell_holds_literals_and_network_calls_are_guarded():
    cells = [c for c in _load()["cells"] if c["cell_type"] == "code"]
    params = [c for c in cells if _is_parameters(c)]
    assert len(params) == 1 and params[0] is cells[0], "the first code cell, and only it, is tagged 'parameters'"
    values = {}
    for stmt in ast.parse(_source(params[0])).body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1, ast.dump(stmt)
        values[stmt.targets[0].id] = ast.literal_eval(stmt.value)  # papermill-style injection needs literals
    assert values["TINY"] is False and values["CONFIG_FILE"] == "configs/llava7b.py"
    for cell in cells:
        assert unguarded_network_calls(ast.parse(_source(cell))) == [], cell["id"]
    # the network steps exist (the check above is not vacuous)
    calls = {_call_name(n) for c in cells for n in ast.walk(ast.parse(_source(c))) if isinstance(n, ast.Call)}
    assert {"sh", "snapshot_download", "hf_hub_download", "upload_folder"} <= calls


# ----------------------------------------------------------------------------- TINY run

VAL_IDS = [101, 102, 103, 104]


def _coco_split(root, split, ids, category_ids):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(ids))
    images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg", "height": 40, "width": 72} for i in ids]
    for im in images:
        PIL.Image.fromarray(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(root / split / im["file_name"])
    categories = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 61, "name": "cake"}]
    anns = [{"id": k, "image_id": i, "category_id": category_ids[k % len(category_ids)]} for k, i in enumerate(ids)]
    caps = [{"id": k, "image_id": i, "caption": "A dog next to a cake."} for k, i in enumerate(ids)]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories}))
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": caps}))
    return images


def _tiny_inputs(tmp) -> dict:
    """Tiny random models and fixture files, as values for the notebook's parameters."""
    paths = toy_world.make_toy_world(tmp / "world")
    # head_dim explicit, as in converted Hugging Face checkpoints: export checks that its
    # config.json reads back to the model's config field for field
    meta_path = pathlib.Path(paths["policy"]) / "fisao_config.json"
    meta = json.loads(meta_path.read_text())
    text = meta["config"]["text"]
    text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    meta_path.write_text(json.dumps(meta))
    coco = tmp / "coco"
    train = _coco_split(coco, "train2014", list(range(1, 9)), [18, 61])
    _coco_split(coco, "val2014", VAL_IDS, [1, 18])
    instruct = [{"id": str(k), "image": im["file_name"],
                 "conversations": [{"from": "human", "value": "<image>\nWhat is on the table?"},
                                   {"from": "gpt", "value": "A cake."}]} for k, im in enumerate(train)]
    (tmp / "instruct.json").write_text(json.dumps(instruct))
    (tmp / "baseline.json").write_text(json.dumps({"s_c": 1.0, "s_h": -1.0, "s_min": -4.0, "s_max": 4.0}))
    pope = [{"question_id": q, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a {obj} in the image?",
             "label": label}
            for q, (i, obj, label) in enumerate([(101, "person", "yes"), (101, "car", "no"), (102, "dog", "yes"),
                                                 (103, "sink", "no")], start=1)]
    (tmp / "coco_pope_random.json").write_text("".join(json.dumps(q) + "\n" for q in pope))
    return {
        "TINY": True, "REPO_DIR": str(ROOT), "WORK": str(tmp / "work"),
        "POLICY_DIR": paths["policy"], "VERIFIER_DIR": paths["verifier"], "TOKENIZER_DIR": paths["tokenizer"],
        "VERIFIER_TOKENIZER_DIR": paths["tokenizer"], "COCO_ROOT": str(coco), "INSTRUCT_JSON": str(tmp / "instruct.json"),
        "POPE_FILES": [str(tmp / "coco_pope_random.json")],
        "CHAIR_SYNONYMS": "",  # the packaged table
        "BASELINE_PATH": str(tmp / "baseline.json"), "EXPORT_DTYPE": "float32", "RUN_NAME": "tiny",
        "CONFIG_OVERRIDES": {
            "model.dtype": "float32", "model.lora_rank": 8, "model.lora_alpha": 16.0, "model.remat": False,
            "data.num_prompts": 100, "data.max_prompt_len": 248, "data.calibration_images": 4,
            "calibration.batch_size": 4, "rollout.max_new_tokens": 6, "train.batch_size": 4,
            "train.num_iterations": 1, "train.checkpoint_every": 1, "eval.num_images": 4, "eval.batch_size": 4,
            "eval.max_new_tokens": 6, "ppo.lr": 2e-3, "ppo.num_minibatches": 1,
            # data parallel over 4 of the 8 fake CPU devices (batches of 4 rows); FSDP there
            # only slows the run down
            "mesh.data": -1, "mesh.fsdp": 1, "mesh.devices": 4,
            # random tiny models rarely spell an entity word: the sentence-level reward gives the
            # one PPO iteration a signal, so that the trained adapter differs from the base
            "reward.kind": "sentence"},
    }


def run_notebook(overrides: dict) -> dict:
    """Execute the code cells in one namespace; `overrides` land right after the parameters cell."""
    ns = {"__name__": "__main__"}
    for cell in _load()["cells"]:
        if cell["cell_type"] != "code":
            continue
        exec(compile(_source(cell), f"<notebook cell {cell['id']}>", "exec"), ns)
        if _is_parameters(cell):
            ns.update(overrides)
    return ns


def _official_pope_parse(answer: str) -> str:
    """POPE's evaluate.py, written out: the first sentence, commas dropped, split on spaces."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


@pytest.mark.slow
def test_notebook_runs_end_to_end_in_tiny_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the notebook adds REPO_DIR
    inputs = _tiny_inputs(tmp_path)
    ns = run_notebook(inputs)
    run = tmp_path / "work" / "runs" / "tiny"

    # the experiment config is configs/llava7b.py with the paths and overrides applied
    config = ns["config"]
    assert pathlib.Path(ns["spec"].origin) == ROOT / "configs" / "llava7b.py"
    assert config.model.policy == inputs["POLICY_DIR"] and config.data.coco_root == inputs["COCO_ROOT"]
    assert config.model.lora_rank == 8 and config.train.num_iterations == 1

    # entity table: one row per entity of the packaged vocabulary, toy CLIP projection width 16;
    # the trainer found it in the cache (a different key would have added a second table)
    resource = json.loads((ROOT / "fisao_jax" / "resources" / "entities_v1.json").read_text())
    assert tuple(ns["text_table"].shape) == (len(resource["entities"]), 16)
    assert len(list((run / "cache").glob("entity_table_*.npy"))) == 1

    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["baseline"]["s_c"] == 1.0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    # base weights + the trainer's adapter write the trainer's final greedy captions (that the
    # adapter moved the weights is checked below: a random tiny model's decoded text often does
    # not change, different byte tokens all decoding to U+FFFD)
    after_eval = json.loads((run / "eval_after_1.json").read_text())
    after = {e["image_id"]: e["text"] for e in after_eval["examples"]}
    lines = (run / "chair_captions.jsonl").read_text().splitlines()
    captions = {c["image_id"]: c["caption"] for c in map(json.loads, lines)}
    assert sorted(captions) == VAL_IDS
    assert captions == after

    # CHAIR ground truth by hand: instance categories (person / dog alternating) + caption objects
    gt = json.loads((run / "chair_gt_objects.json").read_text())
    assert gt == {"101": ["cake", "dog", "person"], "102": ["cake", "dog"], "103": ["cake", "dog", "person"],
                  "104": ["cake", "dog"]}
    for key in ("CHAIRs", "CHAIRi", "Recall", "Len"):
        assert ns["chair_after"][key] == pytest.approx(after_eval[key])

    # POPE: accuracy from the answer files, parsed by hand, against the labels written above
    labels = {1: "yes", 2: "no", 3: "yes", 4: "no"}
    answers = {}
    for model in ("base", "fisao"):
        answers[model] = {r["question_id"]: r["text"] for r in
                          map(json.loads, (run / f"pope_answers_{model}_random.jsonl").read_text().splitlines())}
        assert sorted(answers[model]) == [1, 2, 3, 4]
        correct = sum(_official_pope_parse(a) == labels[q] for q, a in answers[model].items())
        scores = json.loads((run / "pope_scores.json").read_text())[model]["random"]
        assert scores["accuracy"] == pytest.approx(correct / 4) and scores["num_questions"] == 4
    # each model answered with its own weights (the decoded answers of a random tiny model can
    # coincide: different byte tokens all decode to U+FFFD)
    assert ns["models"]["base"] is ns["setup"].params and ns["models"]["fisao"] is ns["trained"]
    assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), ns["setup"].params,
                                                ns["trained"])))

    # export: transformers loads the folder; a merged kernel equals W + alpha/r * A @ B by hand
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    from transformers import LlavaForConditionalGeneration

    export_dir = tmp_path / "work" / "export" / "tiny-hf"
    model, info = LlavaForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32,
                                                                output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    adapter = load_file(run / "adapter" / "adapter.safetensors")
    a = adapter["language_model/layers_0/self_attn/q_proj/lora_a"]
    b = adapter["language_model/layers_0/self_attn/q_proj/lora_b"]
    kernel = np.asarray(ns["setup"].params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"])
    delta = 16.0 / 8 * a.astype(np.float64) @ b.astype(np.float64)
    assert np.abs(delta).max() > 1e-4  # training moved the adapter: merged != base
    weight = next(v for k, v in model.state_dict().items()
                  if "language_model" in k and k.endswith("layers.0.self_attn.q_proj.weight"))
    np.testing.assert_allclose(weight.numpy(), (kernel + delta).T, atol=1e-6)

    results = json.loads((run / "results.json").read_text())
    assert results["iterations"] == 1 and set(results["pope_accuracy"]) == {"base", "fisao"}
