"""prm.py: packed scoring, aggregation, save/load, step parsing, readers and their errors."""
import json
import math

import pytest
import torch

import prm

QUESTION = "How many circles are in the image, and what is their sum?"


def make_steps(n, seed):
    """n steps of different lengths (1 to 7 steps per CoT in the tests)."""
    words = "we count the shapes in the image then add 3 and 4 to get 7 so the total is".split()
    return [f"Step {i + 1}: " + " ".join(words[: 2 + (seed * 5 + i * 3) % len(words)]) for i in range(n)]


def encode_batch(model, images):
    counts = [1, 3, 5, 7, 2]
    cots = []
    for b, n in enumerate(counts):
        image = images[b % len(images)] if images else None
        cots.append(prm.encode_cot(model.tokenizer, QUESTION, make_steps(n, b), final=str(b),
                                   image=image, image_processor=model.image_processor, family=model.family))
    return cots


@pytest.mark.parametrize("mode", ["text", "images", "mixed"])
def test_packed_equals_per_prefix(tiny_prm, images, mode):
    imgs = {"text": None, "images": images, "mixed": [images[0], None, images[2]]}[mode]
    if mode == "mixed":
        cots = [prm.encode_cot(tiny_prm.tokenizer, QUESTION, make_steps(n, b), "A",
                               imgs[b % 3], tiny_prm.image_processor, family=tiny_prm.family)
                for b, n in enumerate([2, 7, 1, 4])]
    else:
        cots = encode_batch(tiny_prm, imgs)
    with torch.no_grad():
        v, m = prm.step_values(tiny_prm, cots)           # (B, S)
        v_ref, m_ref = prm.prefix_values(tiny_prm, cots)
    assert v.shape == (len(cots), 7) and torch.equal(m, m_ref)
    assert m.sum().item() == sum(len(c.step_ends) for c in cots)
    assert (v - v_ref)[m].abs().max().item() <= 1e-5
    # The values differ between steps: the comparison is not between constants.
    assert v[m].std().item() > 1e-3


def test_step_ends_are_exact_token_positions(tiny_prm, images):
    steps = ["Step 1: 12+30=42", "Step 2: Hence,the answer(s)", "Step 3: x"]
    e = prm.encode_cot(tiny_prm.tokenizer, QUESTION, steps, "B", images[1], tiny_prm.image_processor,
                       family=tiny_prm.family)
    tok = tiny_prm.tokenizer
    texts = steps[:-1] + [steps[-1] + "\nFinal answer: B"]
    for end, text in zip(e.step_ends.tolist(), texts):
        assert tok.decode(e.input_ids[: end + 1]).endswith(text)
        assert not tok.decode(e.input_ids[: end]).endswith(text)
    n_image = int((e.input_ids == tok.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert n_image == int(e.images["image_grid_thw"].prod()) // 4 == int(e.image_mask.sum())
    assert e.input_ids[: e.prompt_len].tolist() == prm.encode_prompt(tok, QUESTION, e.images, tiny_prm.family)
    with pytest.raises(ValueError, match="needs the backbone's Family"):     # no silent Qwen2-VL rules
        prm.encode_cot(tok, QUESTION, steps, "B", images[1], tiny_prm.image_processor)


def test_encoded_cot_is_pinned_to_the_token(tiny_prm):
    """The step format that every stage trains and scores with, and every saved PRM reads, pinned
    token by token on the tiny tokenizer: the chat template's user turn, then one step per line,
    the final-answer line inside the last step; each step's value is read at its last token."""
    tok = tiny_prm.tokenizer
    e = prm.encode_cot(tok, "What is 3 + 4?", ["Three plus four.", "That makes 7."], "7")
    assert tok.decode(e.input_ids) == ("<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
                                       "Three plus four.\nThat makes 7.\nFinal answer: 7")
    assert e.input_ids.tolist() == [513, 391, 276, 198, 54, 370, 300, 220, 18, 220, 10, 220, 19, 30, 514, 198, 513,
                                    303, 82, 72, 82, 83, 64, 288, 198, 51, 71, 259, 68, 508, 220, 357, 84, 81, 13,
                                    198, 51, 370, 318, 74, 263, 220, 22, 13, 198, 331, 275, 302, 25, 220, 22]
    assert (e.prompt_len, e.step_ends.tolist()) == (25, [34, 50])
    assert tok.decode(e.input_ids[:35]).endswith("four.") and tok.decode(e.input_ids[25:]).startswith("Three")


def test_aggregate_mean_logit_by_hand():
    values = torch.tensor([[0.9, 0.2, 0.6], [0.7, 0.3, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    A = prm.aggregate(values, mask)
    by_hand = [1 / (1 + math.exp(-sum(math.log(p / (1 - p)) for p in row) / len(row)))
               for row in ([0.9, 0.2, 0.6], [0.7, 0.3])]
    assert torch.allclose(A, torch.tensor(by_hand), atol=1e-6)
    # Padding is ignored: changing a padded value changes nothing.
    values2 = values.clone()
    values2[1, 2] = 0.99
    for how in prm.AGGREGATIONS:
        assert torch.equal(prm.aggregate(values, mask, how), prm.aggregate(values2, mask, how)), how
    assert torch.allclose(prm.aggregate(values, mask, "min"), torch.tensor([0.2, 0.3]))
    assert torch.allclose(prm.aggregate(values, mask, "prod"), torch.tensor([0.9 * 0.2 * 0.6, 0.7 * 0.3]))
    assert torch.allclose(prm.aggregate(values, mask, "last"), torch.tensor([0.6, 0.3]))
    assert torch.allclose(prm.aggregate(values, mask, "mean"), torch.tensor([1.7 / 3, 0.5]))


def test_aggregate_exact_zero_and_one_are_finite():
    values = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], requires_grad=True)
    mask = torch.ones(3, 3, dtype=torch.bool)
    A = prm.aggregate(values, mask)
    assert torch.isfinite(A).all()
    assert 0 < A[1] < 1e-5 and 1 - 1e-5 < A[2] <= 1
    A.sum().backward()
    assert torch.isfinite(values.grad).all()


def test_save_then_load_gives_identical_values(tiny_prm, backbone_dir, images, tmp_path):
    model = prm.PRM.from_backbone(backbone_dir, seed=3)
    out = str(tmp_path / "saved")
    model.save_pretrained(out)
    loaded = prm.PRM.from_pretrained(out)
    cots = encode_batch(model, images)
    with torch.no_grad():
        v1, m1 = prm.step_values(model, cots)
        v2, m2 = prm.step_values(loaded, cots)
    assert torch.equal(v1[m1], v2[m2])
    meta = json.load(open(f"{out}/prm.json"))
    assert meta["step_sep"] == prm.STEP_SEP and meta["hidden_size"] == 64
    # A different head seed gives different values, so equality above is not trivial.
    with torch.no_grad():
        v3, _ = prm.step_values(tiny_prm, cots)
    assert not torch.equal(v1[m1], v3[m1])


def test_tiny_backbone_is_deterministic():
    m1, tok1, _ = prm.tiny_backbone(seed=5)
    m2, tok2, _ = prm.tiny_backbone(seed=5)
    m3, _, _ = prm.tiny_backbone(seed=6)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    assert tok1("Step 12: 345")["input_ids"] == tok2("Step 12: 345")["input_ids"]
    digits = tok1("345", add_special_tokens=False)["input_ids"]
    assert len(digits) == 3  # one token per digit


STRUCTURED = """Let's think.

Step 1: Restate the question.
   - It asks for the sum.

### Step 2: Gather evidence from the image
The image shows 3 and 4.

**Step 3**: Reason. 3 + 4 = 7.

Final answer: 7"""


def test_split_steps_structured_free_and_stepless():
    s = prm.split_steps(STRUCTURED)
    assert len(s.steps) == 3 and s.final == "7" and s.preamble == "Let's think."
    assert s.steps[0].startswith("Step 1: Restate") and s.steps[0].endswith("sum.")
    assert s.steps[1].startswith("### Step 2") and s.steps[2].startswith("**Step 3**")
    free = prm.split_steps("First I look at the image.\n\nThen I add them.\n\nFinal answer: (B)")
    assert free.steps == ["First I look at the image.", "Then I add them."] and free.final == "(B)"
    for text in ["", "   \n\n ", "Final answer: C"]:
        s = prm.split_steps(text)
        assert s.steps == []
    assert prm.split_steps("Question: what?\nOptions: (A) x", paragraphs=False).steps == []
    assert prm.step_segments([]) == []


def write_published(tmp_path, images):
    img = images[0]
    meta = [
        {"id": 2, "true_false": True, "input": "Question: Sum?\nOptions: (A) 7 (B) 8\n\n" + STRUCTURED.split("\n\n", 1)[1],
         "image_path": img},
        {"id": 2, "true_false": False, "input": "Question: Sum?\nOptions: (A) 7 (B) 8", "image_path": img},
    ]
    s1 = "Step 1: Restate the question."
    s2 = s1 + "\n\nStep 2: The image shows 3."
    train = [
        {"id": 5, "sid": 1, "input": "Question: Q5", "add": s1, "image_path": img, "dataset": "ai2d", "accuracy": 0.75},
        {"id": 5, "sid": 2, "input": "Question: Q5", "add": s2, "image_path": img, "dataset": "ai2d", "accuracy": 0.5},
        {"id": 6, "sid": 1, "input": "Question: Q6", "add": s1, "image_path": img, "dataset": "m3cot", "accuracy": 1.0},
        {"id": 6, "sid": 1, "input": "Question: Q6", "add": "", "image_path": img, "dataset": "m3cot", "accuracy": 1.0},
    ]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "train.json").write_text(json.dumps(train))
    return str(tmp_path / "meta.json"), str(tmp_path / "train.json")


def test_published_format_parses(tmp_path, images, tiny_prm):
    meta_path, train_path = write_published(tmp_path, images)
    meta, skipped = prm.read_cots(meta_path, "cots")
    assert len(skipped) == 1 and len(meta) == 1
    assert meta[0]["correct"] is True and len(meta[0]["steps"]) == 3 and meta[0]["final"] == "7"
    assert meta[0]["_question"].startswith("Question: Sum?")
    train, skipped = prm.read_cots(train_path, "labels")
    assert len(skipped) == 1 and skipped[0].domain == "m3cot" and skipped[0].reason == "no steps"
    by_id = {r["id"]: r for r in train}
    assert by_id["5"]["mc"] == [0.75, 0.5] and by_id["5"]["domain"] == "ai2d"
    assert by_id["6"]["mc"] == [1.0]
    e = tiny_prm.encode(meta[0])
    assert len(e.step_ends) == 3 and e.images is not None


def test_our_jsonl_records_read(tmp_path, images):
    rec = {"id": "q1", "domain": "clean", "question": "Sum?", "image": "img0.png", "answer": "7",
           "choices": ["7", "8"], "sample": 0, "steps": ["Step 1: a", "Step 2: b"], "final": "A", "pred": "A",
           "correct": True, "policy": "toy", "mc": [0.5, 1.0], "rollouts": [4, 4]}
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    (r,) = prm.read_cots(str(path), "labels", fmt="ours")[0]
    assert r["_image"] == images[0] and r["_question"] == "Sum?\nOptions: (A) 7 (B) 8"


# -- bad input: each gives a DataError naming file, line and field ------------------------------

GOOD = {"id": "q1", "domain": "clean", "question": "Sum?", "image": None, "answer": "7",
        "steps": ["Step 1: a"], "final": "7", "pred": "7", "correct": True, "mc": [1.0], "rollouts": [4]}


def bad_line(tmp_path, line, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    return str(path)


@pytest.mark.parametrize("line,field,words", [
    ('{"id": "q2", "domain": ', None, "malformed JSON"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "question"}), "question", "missing"),
    (json.dumps({**GOOD, "image": "nope.png"}), "image", "no such image"),
    (json.dumps({**GOOD, "image": "notimage.png"}), "image", "not an image"),
    (json.dumps({**GOOD, "mc": [1.5]}), "mc", "not a number in [0, 1]"),
    (json.dumps({**GOOD, "mc": [float("nan")]}), "mc", "not a number in [0, 1]"),
    (json.dumps({**GOOD, "mc": [0.5, 0.5]}), "mc", "2 labels for 1 steps"),
])
def test_bad_input_errors(tmp_path, line, field, words):
    (tmp_path / "notimage.png").write_text("this is text, not a PNG")
    path = bad_line(tmp_path, line)
    with pytest.raises(prm.DataError) as info:
        prm.read_cots(path, "labels", fmt="ours")[0]
    msg = str(info.value)
    assert msg.startswith(f"{path}:2") and words in msg and "\n" not in msg
    if field:
        assert f"field '{field}'" in msg and info.value.field == field


def test_model_dir_without_prm_files(backbone_dir, tmp_path):
    with pytest.raises(prm.DataError, match="not a PRM directory"):
        prm.PRM.from_pretrained(backbone_dir)
    with pytest.raises(prm.DataError, match="not a PRM directory"):
        prm.PRM.from_pretrained(str(tmp_path))
    with pytest.raises(prm.DataError, match="no such model directory"):
        prm.resolve_model(str(tmp_path / "missing"))


def test_cli_error_is_one_line_and_exit_2(tmp_path, capsys):
    path = bad_line(tmp_path, json.dumps({**GOOD, "mc": [-0.1]}))
    code = prm.run_cli(lambda argv: prm.read_cots(path, "labels", fmt="ours")[0], [])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{path}:2" in err and "Traceback" not in err


def test_torn_tail_is_dropped(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"id": "q2", "dom')
    assert [i for i, _ in prm.iter_jsonl(str(path), drop_torn_tail=True)] == [1]
    with pytest.raises(prm.DataError):
        list(prm.iter_jsonl(str(path)))
    prm.drop_torn_tail(str(path))
    assert path.read_text() == json.dumps(GOOD) + "\n"


@pytest.mark.parametrize("with_image", [True, False])
def test_shared_prefix_equals_packed(tiny_prm, images, with_image):
    image = images[2] if with_image else None
    cots = [prm.encode_cot(tiny_prm.tokenizer, QUESTION, make_steps(n, b), str(b), image, tiny_prm.image_processor,
                           family=tiny_prm.family) for b, n in enumerate([3, 5, 1, 7, 2, 5, 4, 6])]
    with torch.no_grad():
        v, m = prm.step_values(tiny_prm, cots)
        v_shared, m_shared = prm.shared_prefix_values(tiny_prm, cots)
    assert torch.equal(m, m_shared)
    assert (v - v_shared)[m].abs().max().item() <= 1e-4
    assert v[m].std().item() > 1e-3
    other = prm.encode_cot(tiny_prm.tokenizer, "Another question?", ["Step 1: a"], "", image, tiny_prm.image_processor,
                           family=tiny_prm.family)
    with pytest.raises(ValueError, match="one question"):
        prm.shared_prefix_values(tiny_prm, cots[:2] + [other])


def test_text_only_backbone(text_lm_dir):
    """A text-only causal LM as the backbone (a text PRM): AutoModel gives its base model, there is
    no image processor, and packed scoring still equals per-prefix scoring."""
    model = prm.PRM.from_backbone(text_lm_dir).eval()
    assert model.image_processor is None and type(model.backbone).__name__ == "Qwen2Model"
    cots = [prm.encode_cot(model.tokenizer, QUESTION, make_steps(n, b), "7") for b, n in enumerate([2, 5, 1])]
    with torch.no_grad():
        v, m = prm.step_values(model, cots)
        v_ref, _ = prm.prefix_values(model, cots)
        v_shared, _ = prm.shared_prefix_values(model, cots)
    assert (v - v_ref)[m].abs().max() <= 1e-5 and (v - v_shared)[m].abs().max() <= 1e-4
    with pytest.raises(ValueError, match="no image processor"):
        prm.encode_cot(model.tokenizer, QUESTION, ["Step 1: a"], "", "x.png", None)
