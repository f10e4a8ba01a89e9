"""Every image-text family of prm.FAMILIES, on a tiny random model of its own classes: prompts as
its processor builds them, packed = per-prefix = shared-prefix values and gradients, a bi-level run,
a PRM directory that round-trips, reranking, and sampling and rollouts with --policy hf."""
import json
import os

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import bilevel_train as bt
import gen_cots
import mc_label
import prm
import rerank

FAMILIES = list(prm.FAMILIES)
QUESTION = "What is the sum of the two numbers?"
STEPS = ["Step 1: Read 3 and 4.", "Step 2: Add them: 3 + 4 = 7.", "Step 3: The sum is 7."]


@pytest.fixture(scope="session")
def family_prm(family_dir):
    """family -> a fresh PRM on its tiny backbone, loaded once per session (eval mode)."""
    loaded = {}

    def get(family):
        if family not in loaded:
            loaded[family] = prm.PRM.from_backbone(family_dir(family)).eval()
        return loaded[family]
    return get


@pytest.fixture(scope="session")
def pictures(tmp_path_factory):
    """Four images of different sizes and aspect ratios (different tile grids and token counts)."""
    root = tmp_path_factory.mktemp("pictures")
    paths = []
    for i, (w, h) in enumerate([(56, 56), (90, 60), (112, 112), (40, 100)]):
        im = Image.new("RGB", (w, h), (255 - 60 * i, 40 * i, 90))
        ImageDraw.Draw(im).ellipse([5, 5, w - 5, h - 5], fill=(20 * i, 200, 30))
        im.save(root / f"p{i}.png")
        paths.append(str(root / f"p{i}.png"))
    return paths


def processor_ids(family, tokenizer, image_processor, config, text, image):
    """The prompt's token ids as the family's own processor class builds them from the templated
    text and the image. Every class is built with video_processor=None where it takes one (the
    argument-class check, which needs torchvision's video classes, is skipped; the expansion is the
    class's own). SmolVLM's class needs num2words, which this project does not install: for it the
    rule of its processing file (get_image_prompt_string) builds the text, and the tokenizer its ids."""
    import transformers as T
    from transformers.processing_utils import ProcessorMixin
    vision = config.vision_config
    tiles = (prm._side(vision.image_size) // prm._side(vision.patch_size)) ** 2 if hasattr(vision, "image_size") else None
    build = {
        "qwen2_vl": lambda: T.Qwen2VLProcessor(image_processor, tokenizer, video_processor=None),
        "qwen2_5_vl": lambda: T.Qwen2_5_VLProcessor(image_processor, tokenizer, video_processor=None),
        "qwen3_vl": lambda: T.Qwen3VLProcessor(image_processor, tokenizer, video_processor=None),
        "internvl": lambda: T.InternVLProcessor(image_processor, tokenizer, video_processor=None,
                                                image_seq_length=config.image_seq_length),
        "llava_onevision": lambda: T.LlavaOnevisionProcessor(
            image_processor, tokenizer, video_processor=None, num_image_tokens=tiles,
            vision_feature_select_strategy=config.vision_feature_select_strategy),
        "gemma3": lambda: T.Gemma3Processor(image_processor, tokenizer, image_seq_length=config.mm_tokens_per_image),
        "idefics3": lambda: T.Idefics3Processor(image_processor, tokenizer,
                                                image_seq_len=int(tiles / config.scale_factor ** 2)),
    }
    if family == "smolvlm":
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string
        out = image_processor(images=[[image]], return_row_col_info=True)
        expanded = get_image_prompt_string(out["rows"][0][0], out["cols"][0][0], int(tiles / config.scale_factor ** 2),
                                           "<fake_token_around_image>", "<image>", "<global-img>")
        return tokenizer(text.replace("<image>", expanded), add_special_tokens=False)["input_ids"]
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        processor = build[family]()
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    return processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)["input_ids"][0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_are_the_family_processors(family, family_prm, pictures):
    """(a) The prompt's token ids with an image equal the family's processor + chat template output,
    for images of four sizes, after our --max-side shrink too (the family's resize comes after ours)."""
    model = family_prm(family)
    tok, ip, config = model.tokenizer, model.image_processor, model.backbone.config
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                   tokenize=False, add_generation_prompt=True)
    counts = []
    for max_side in (None, 30):
        for path in pictures:
            image = Image.open(path).convert("RGB")
            if max_side:
                image = image.resize((max(1, int(image.width * max_side / max(image.size))),
                                      max(1, int(image.height * max_side / max(image.size)))), Image.Resampling.LANCZOS)
            e = prm.encode_cot(tok, QUESTION, STEPS, "7", path, ip, image_limits={"max_side": max_side},
                               family=model.family)
            ours = e.input_ids[:e.prompt_len].tolist()
            assert ours == processor_ids(family, tok, ip, config, text, image), (family, path, max_side)
            counts.append(int(e.image_mask.sum()))
            assert counts[-1] == ours.count(tok.convert_tokens_to_ids(model.family.image_token)) > 0
    assert sum(counts[4:]) <= sum(counts[:4])                     # a smaller image: never more image tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_per_prefix_and_shared_prefix_agree(family, family_prm, pictures):
    """(b) One forward per CoT, one per prefix, and one per question with the prompt cached give the
    same step values (1e-5, fp32), with an image and without; the shared-prefix forward used in
    training gives the same loss gradient as the packed one."""
    model = family_prm(family)
    for image in (pictures[2], None):
        cots = [model.encode(dict(question=QUESTION, steps=STEPS[:k], final="7", image=image)) for k in (1, 2, 3, 3)]
        with torch.no_grad():
            v, m = prm.step_values(model, cots)
            v_ref, _ = prm.prefix_values(model, cots)
            v_shared, m_shared = prm.shared_prefix_values(model, cots)
        assert torch.equal(m, m_shared) and v[m].std() > 1e-4
        assert (v - v_ref)[m].abs().max() <= 1e-5 and (v - v_shared)[m].abs().max() <= 1e-5, family
    mixed = [model.encode(dict(question=QUESTION, steps=STEPS[:k], final="7", image=pictures[k])) for k in (1, 2, 3)]
    with torch.no_grad():
        v, m = prm.step_values(model, mixed)
        v_ref, _ = prm.prefix_values(model, mixed)
    assert (v - v_ref)[m].abs().max() <= 1e-5                    # a batch of different images (tiles padded)
    grads = []
    for fn in (prm.step_values, prm.shared_prefix_values, prm.shared_prefix_values):
        if len(grads) == 2:                                      # then with each layer recomputed in backward
            bt.enable_checkpointing(model.train())
        model.zero_grad()
        v, m = fn(model, cots[:3])
        (v[m] ** 2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    (getattr(model.backbone, "activation_checkpointing_disable", None) or model.backbone.gradient_checkpointing_disable)()
    model.eval().zero_grad()
    for g in grads[1:]:
        assert g.shape == grads[0].shape and (g - grads[0]).abs().max() <= 1e-5 * grads[0].abs().max(), family


def labels(path, pictures, rows):
    with open(path, "w") as f:
        for i, (domain, image, mc) in enumerate(rows):
            f.write(json.dumps({"id": f"{domain}{i}", "domain": domain, "question": f"{domain}{i}: {QUESTION}", "answer": "7",
                                "image": image, "steps": STEPS[:len(mc)], "final": "7", "correct": mc[-1] == 1.0,
                                "mc": mc}) + "\n")
    return str(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bilevel_run_trains_saves_loads_and_reranks(family, family_dir, pictures, tmp_path, capsys):
    """(c) Two outer iterations train: finite losses, the PRM and the domain weights move; (d) the
    PRM directory names its family and loads back strictly; (e) rerank.py scores with it."""
    train = labels(tmp_path / "train.jsonl", pictures, [("a", pictures[0], [1.0, 1.0]), ("a", None, [1.0, 0.0, 0.0]),
                                                        ("b", pictures[1], [0.0, 0.0]), ("b", pictures[3], [1.0])])
    meta = labels(tmp_path / "meta.jsonl", pictures, [("m", pictures[2], [1.0, 1.0]), ("m", None, [1.0, 0.0])])
    out = str(tmp_path / "run")
    assert bt.main(["--train", train, "--meta", meta, "--model", family_dir(family), "--out", out, "--iterations", "2",
                    "--unroll-steps", "1", "--train-batch", "2", "--meta-batch", "2", "--lr", "1e-3",
                    "--meta-lr", "0.1", "--allow-outside-images"]) == 0
    rows = [json.loads(x) for x in open(f"{out}/metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor([r["lower/loss"], r["upper/loss"]])).all() for r in rows)
    alpha = json.load(open(f"{out}/domain_weights.json"))["final"]
    assert abs(alpha["a"] - alpha["b"]) > 1e-4                                    # the weights moved
    start = prm.PRM.from_backbone(family_dir(family))
    trained = prm.PRM.from_pretrained(out)
    assert json.load(open(f"{out}/prm/prm.json"))["model_type"] == family == trained.backbone.config.model_type
    assert trained.family.placeholder == prm.FAMILIES[family].placeholder
    moved = [k for k, v in trained.backbone.state_dict().items() if not torch.equal(v, start.backbone.state_dict()[k])]
    assert moved, "the backbone did not train"
    weights = load_file(f"{out}/prm/model.safetensors")
    weights.pop(sorted(weights)[0])
    save_file(weights, f"{out}/prm/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(prm.DataError, match="weights do not match the model's config: missing"):
        prm.PRM.from_pretrained(out)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"id": "q", "domain": "t", "question": QUESTION, "answer": "7", "sample": k,
                                        "image": pictures[0], "steps": STEPS[:2], "final": "7", "correct": k == 0,
                                        "mc": [1.0, float(k == 0)]}) + "\n" for k in range(2)))
    test = str(test)
    saved = str(tmp_path / "prm")
    start.save_pretrained(saved)
    assert rerank.main(["--cots", test, "--prm", saved, "--names", "p", "--out", str(tmp_path / "rr"),
                        "--allow-outside-images"]) == 0
    scores = [json.loads(x)["prms"]["p"]["score"] for x in open(tmp_path / "rr" / "scores.jsonl")]
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_hf_policy_samples_and_rolls_out_with_an_image(family, family_dir, pictures, tmp_path):
    """(f) gen_cots.py and mc_label.py with --policy hf on the family's model, a question with an
    image beside one without."""
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"id": i, "domain": "d", "question": QUESTION, "answer": "7", "image": image}) + "\n"
                         for i, image in (("a", pictures[1]), ("b", None))))
    hf = ["--policy", "hf", "--model", family_dir(family), "--max-tokens", "4", "--allow-outside-images"]
    assert gen_cots.main(["--questions", str(q), "--out", str(tmp_path / "c.jsonl"), "--n", "2"] + hf) == 0
    cots = [json.loads(x) for x in open(tmp_path / "c.jsonl")]
    assert [(c["id"], c["sample"]) for c in cots] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    c = tmp_path / "cots.jsonl"
    c.write_text(json.dumps({"id": "a", "domain": "d", "question": QUESTION, "answer": "7", "sample": 0,
                             "image": os.path.relpath(pictures[1], tmp_path), "steps": STEPS, "final": "7",
                             "correct": True}) + "\n")
    assert mc_label.main(["--cots", str(c), "--out", str(tmp_path / "l.jsonl"), "--rollouts", "2"] + hf) == 0
    (row,) = [json.loads(x) for x in open(tmp_path / "l.jsonl")]
    assert row["rollouts"] == [2, 2, 0] and len(row["mc"]) == 3
