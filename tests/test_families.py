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
    """Four images of different sizes and aspect ratios (different tile grids and token counts), and
    a fifth of the first one's size with other pixels."""
    root = tmp_path_factory.mktemp("pictures")
    paths = []
    for i, (w, h) in enumerate([(56, 56), (90, 60), (112, 112), (40, 100), (56, 56)]):
        im = Image.new("RGB", (w, h), (255 - 60 * i, 40 * i, 90))
        ImageDraw.Draw(im).ellipse([5, 5, w - 5, h - 5], fill=(20 * i, 200, 30))
        im.save(root / f"p{i}.png")
        paths.append(str(root / f"p{i}.png"))
    return paths


def family_processor(family, tokenizer, image_processor, config, chat_template=None):
    """The family's own processor class built from its parts, with video_processor=None where it
    takes one (the argument-class check, which needs torchvision's video classes, is skipped; the
    expansion is the class's own); None for SmolVLM, whose class needs num2words, which this project
    does not install."""
    import transformers as T
    from transformers.processing_utils import ProcessorMixin
    vision = config.vision_config
    tiles = (prm._side(vision.image_size) // prm._side(vision.patch_size)) ** 2 if hasattr(vision, "image_size") else None
    kw = dict(chat_template=chat_template)
    build = {
        "qwen2_vl": lambda: T.Qwen2VLProcessor(image_processor, tokenizer, video_processor=None, **kw),
        "qwen2_5_vl": lambda: T.Qwen2_5_VLProcessor(image_processor, tokenizer, video_processor=None, **kw),
        "qwen3_vl": lambda: T.Qwen3VLProcessor(image_processor, tokenizer, video_processor=None, **kw),
        "internvl": lambda: T.InternVLProcessor(image_processor, tokenizer, video_processor=None,
                                                image_seq_length=config.image_seq_length, **kw),
        "llava_onevision": lambda: T.LlavaOnevisionProcessor(
            image_processor, tokenizer, video_processor=None, num_image_tokens=tiles,
            vision_feature_select_strategy=config.vision_feature_select_strategy, **kw),
        "gemma3": lambda: T.Gemma3Processor(image_processor, tokenizer, image_seq_length=config.mm_tokens_per_image,
                                            **kw),
        "idefics3": lambda: T.Idefics3Processor(image_processor, tokenizer,
                                                image_seq_len=int(tiles / config.scale_factor ** 2), **kw),
    }
    if family == "smolvlm":
        return None
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        return build[family]()
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def processor_ids(family, tokenizer, image_processor, config, text, image):
    """The prompt's token ids as the family's own processor class builds them from the templated
    text and the image. For SmolVLM the rule of its processing file (get_image_prompt_string)
    builds the text, and the tokenizer its ids."""
    vision = config.vision_config
    if family == "smolvlm":
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string
        tiles = (prm._side(vision.image_size) // prm._side(vision.patch_size)) ** 2
        out = image_processor(images=[[image]], return_row_col_info=True)
        expanded = get_image_prompt_string(out["rows"][0][0], out["cols"][0][0], int(tiles / config.scale_factor ** 2),
                                           "<fake_token_around_image>", "<image>", "<global-img>")
        return tokenizer(text.replace("<image>", expanded), add_special_tokens=False)["input_ids"]
    processor = family_processor(family, tokenizer, image_processor, config)
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
        for path in pictures[:4]:
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


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_only_prompt_holds_the_question_as_the_processor_renders_it(family, family_dir, family_prm):
    """A question without an image reaches every family's prompt: our ids equal the family's
    processor's apply_chat_template output (list content, as processors take it; the template read
    from the checkpoint folder as the processor reads it), and hold the question's text. Idefics3's
    and LLaVA-OneVision's published templates print nothing for a plain string."""
    model = family_prm(family)
    tok, ip, config = model.tokenizer, model.image_processor, model.backbone.config
    with open(os.path.join(family_dir(family), "chat_template.jinja")) as f:
        template = f.read()
    processor = family_processor(family, tok, ip, config, template)
    message = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    text = (processor or tok).apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    ours = prm.encode_prompt(tok, QUESTION, None, model.family)
    assert ours == tok(text, add_special_tokens=False)["input_ids"], family
    assert QUESTION in tok.decode(ours)
    other = model.encode(dict(question="What is the product of the two numbers?", steps=STEPS, final="7", image=None))
    same = model.encode(dict(question=QUESTION, steps=STEPS, final="7", image=None))
    with torch.no_grad():
        (v_other, m), (v_same, _) = prm.step_values(model, [other]), prm.step_values(model, [same])
    assert (v_other - v_same)[m].abs().max() > 1e-6                 # two questions, two sets of values


@pytest.mark.parametrize("family", FAMILIES)
def test_two_different_images_give_different_values(family, family_prm, pictures):
    """Every family's tiny model sees its image: the same question and steps with two different
    images of the same size give different step values (a Gemma 3 projector left at zeros gave every
    image the same soft tokens)."""
    model = family_prm(family)
    with torch.no_grad():
        v, m = prm.step_values(model, [model.encode(dict(question=QUESTION, steps=STEPS, final="7", image=p))
                                       for p in (pictures[0], pictures[4])])
    assert (v[0] - v[1])[m[0]].abs().max() > 1e-5, family


@pytest.mark.parametrize("family", FAMILIES)
def test_images_shrink_first_only_where_it_bounds_the_tokens(family, family_prm, tmp_path):
    """The default --max-side is the family's: 512 for Qwen and LLaVA-OneVision (the token count
    follows the image's size), none for Gemma 3 (a fixed size), InternVL (a tile grid chosen by the
    aspect ratio) and Idefics3 / SmolVLM (upscaled to their own long side first). At the default, a
    large image's prompt is the processor's on the image shrunk to 512, or on the image as it is."""
    model = family_prm(family)
    assert model.max_side == prm.FAMILIES[family].max_side == \
        (512 if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision") else None)
    big = Image.new("RGB", (1200, 700), (30, 60, 90))
    ImageDraw.Draw(big).ellipse([100, 100, 900, 600], fill=(200, 40, 40))
    big.save(tmp_path / "big.png")
    seen = big if model.max_side is None else big.resize((512, int(700 * 512 / 1200)), Image.Resampling.LANCZOS)
    e = model.encode(dict(question=QUESTION, steps=STEPS, final="7", image=str(tmp_path / "big.png")))
    expected = prm.image_inputs(model.image_processor, seen, family=model.family)
    for name in model.family.tensors:
        assert torch.equal(e.images[name], expected[name]), (family, name)


def test_the_processors_template_is_taken_and_a_bad_one_is_one_line(family_dir, pictures, tmp_path, capsys):
    """A folder whose tokenizer template is text-only and whose processor template (chat_template.json)
    takes images (as some published copies of Qwen2.5-VL-3B are) scores with the processor's, as
    transformers' processors do; a template that cannot render a record is one line naming the
    template's file, exit 2."""
    import shutil
    folder = str(tmp_path / "qwen25")
    shutil.copytree(family_dir("qwen2_5_vl"), folder)
    os.remove(os.path.join(folder, "chat_template.jinja"))
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        config = json.load(f)
    text_only = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] + '' }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config["chat_template"] = text_only
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    import tiny_families
    with open(os.path.join(folder, "chat_template.json"), "w") as f:
        json.dump({"chat_template": tiny_families.QWEN2_VL_TEMPLATE}, f)
    model = prm.PRM.from_backbone(folder)
    assert model.tokenizer.chat_template == tiny_families.QWEN2_VL_TEMPLATE
    assert model.tokenizer.template_file == os.path.join(folder, "chat_template.json")
    e = model.encode(dict(question=QUESTION, steps=STEPS, final="7", image=pictures[0]))
    assert int(e.image_mask.sum()) > 0
    os.remove(os.path.join(folder, "chat_template.json"))          # now only the text-only template is left
    cots = tmp_path / "cots.jsonl"
    cots.write_text(json.dumps({"id": "q", "domain": "t", "question": QUESTION, "answer": "7", "sample": 0,
                                "image": pictures[0], "steps": STEPS, "final": "7", "correct": True}) + "\n")
    prm.PRM.from_backbone(family_dir("qwen2_5_vl")).save_pretrained(str(tmp_path / "p"))
    shutil.copy(os.path.join(folder, "tokenizer_config.json"), tmp_path / "p" / "tokenizer_config.json")
    os.remove(tmp_path / "p" / "chat_template.jinja")
    capsys.readouterr()
    assert prm.run_cli(rerank.main, ["--cots", str(cots), "--prm", str(tmp_path / "p"), "--names", "p",
                                        "--out", str(tmp_path / "rr"), "--allow-outside-images"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "p" / "tokenizer_config.json") in err[0] and "chat template" in err[0], err
    assert not os.path.exists(tmp_path / "rr" / "scores.jsonl")


def test_a_config_that_disagrees_with_itself_is_refused_at_load(tmp_path):
    """A Gemma 3 folder whose mm_tokens_per_image (17) is not what its vision tower pools to (16)
    is refused at load in one line naming the folder and both counts, not at the first image."""
    import tiny_families
    folder = tiny_families.save(str(tmp_path / "gemma17"), "gemma3", tokens_per_image=17)
    with pytest.raises(prm.DataError) as e:
        prm.PRM.from_backbone(folder)
    message = str(e.value)
    assert message.startswith(folder) and "17" in message and "16" in message and "\n" not in message


def test_remote_code_internvl_names_the_hf_checkpoints(tmp_path):
    """A remote-code InternVL folder (model_type internvl_chat) is refused with what to load instead."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "vision_config": {},
                                                      "llm_config": {}}))
    with pytest.raises(prm.DataError, match=r"internvl_chat.*-hf.*OpenGVLab/InternVL3-1B-hf"):
        prm.check_backbone(str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_vision_freezes_each_familys_tower_by_its_name(family, family_dir):
    """--freeze-vision finds the tower under the name its Family gives (visual, vision_tower,
    vision_model) and freezes exactly its parameters."""
    model = prm.PRM.from_backbone(family_dir(family))
    trainable = sum(p.requires_grad for p in model.parameters())
    bt.freeze_vision(model)
    tower = list(getattr(model.backbone, model.family.vision_tower).parameters())
    assert tower and not any(p.requires_grad for p in tower)
    assert sum(p.requires_grad for p in model.parameters()) == trainable - len(tower)
