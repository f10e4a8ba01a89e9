"""Every input format: read faithfully, the published DreamPRM traps, duplicates and leaks.

Fixtures are written here, to each format's published field layout (no downloads).
"""
import json
import shutil

import pytest
import torch

import bilevel_train as bt
import prm
import rerank

QUESTION = "What is the sum of the two numbers?"
STEPS = ["Step 1: Read the numbers 3 and 4.", "Step 2: Add them: 3 + 4 = 7.", "Step 3: The sum is 7."]


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read(path, kind="labels", **kw):
    return prm.read_cots(path, kind, **kw)


# -- each format, field by field ------------------------------------------------------------------

def test_trl_stepwise_supervision(tmp_path, images):
    rows = [{"prompt": QUESTION, "completions": STEPS, "labels": [True, True, False], "images": [images[0]]},
            {"prompt": QUESTION, "completions": STEPS[:2], "labels": [True, True], "image": images[0]},
            {"prompt": QUESTION, "completions": STEPS, "labels": [True] * 3, "images": images[:2]},   # 2 images
            {"prompt": "No steps?", "completions": [], "labels": []},
            {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Chat form?"}]}],
             "completions": ["Step 1: yes."], "labels": [True], "domain": "chat"}]
    for path in (write_jsonl(tmp_path / "math_shepherd.jsonl", rows), write_json(tmp_path / "math_shepherd.json", rows)):
        records, skips = read(path)
        assert [r["_format"] for r in records] == ["trl"] * 3
        a, b, c = records
        assert a["mc"] == [1.0, 1.0, 0.0] and a["correct"] is None and a["steps"] == STEPS   # TRL states none
        assert b["mc"] == [1.0, 1.0] and b["correct"] is None and b["_image"] == images[0]
        assert a["domain"] == b["domain"] == "math_shepherd" and c["domain"] == "chat"
        assert c["_question"] == "Chat form?" and c["_image"] is None
        assert a["id"] == b["id"] != c["id"] and (a["sample"], b["sample"]) == (0, 1)
        assert sorted(s.reason for s in skips) == ["no steps", "several images"]
    records, _ = read(path, domain="prm800k")
    assert records[0]["domain"] == "prm800k" and records[2]["domain"] == "chat"       # a field wins over the flag
    records, _ = read(path, correct_from="last-label")
    assert [r["correct"] for r in records] == [False, True, True]
    with pytest.raises(prm.DataError, match="field 'correct': no final correctness: trl records state none "
                                            r"\(--correct-from last-label"):
        read(path, "cots")
    rows[0]["labels"] = [1.0, 0.75, 0.25]                                              # float labels, as TRL allows
    (a, *_), _ = read(write_jsonl(tmp_path / "floats.jsonl", rows), correct_from="last-label")
    assert a["mc"] == [1.0, 0.75, 0.25] and a["correct"] is False
    rows[0]["labels"] = [1.0, 1.5, 0.0]
    with pytest.raises(prm.DataError, match="floats.jsonl:1: field 'labels': label 1.5 is not true, false or a number"):
        read(write_jsonl(tmp_path / "floats.jsonl", rows))


def vpb_row(image, labels, source="MathVerse", response_as_text=False):
    response = {"steps": STEPS[:len(labels)], "process_correctness": labels}
    return {"image": image, "question": QUESTION, "answer": "7",
            "response": json.dumps(response) if response_as_text else response,
            "policy_model": "InternVL2.5-8B", "data_source": source}


def test_visualprocessbench(tmp_path, images):
    rows = [vpb_row([images[0]], [1, 0, -1]), vpb_row([images[1]], [1, 1], "DynaMath", response_as_text=True),
            vpb_row(images[:2], [1, 1]), vpb_row([], [1])]
    records, skips = read(write_jsonl(tmp_path / "test.jsonl", rows))
    a, b, c = records
    assert a["_format"] == "visualprocessbench"
    assert a["mc"] == [1.0, None, 0.0] and a["correct"] is False and a["domain"] == "MathVerse"
    assert b["mc"] == [1.0, 1.0] and b["correct"] is True and b["domain"] == "DynaMath"
    assert a["_image"] == images[0] and c["_image"] is None and a["answer"] == "7"
    assert [s.reason for s in skips] == ["several images"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [vpb_row([images[0]], [1, 2])])
    with pytest.raises(prm.DataError, match="bad.jsonl:1: field 'response.process_correctness'"):
        read(bad)


def test_dreamprm_minimal_custom_records(tmp_path, images):
    """The official README's minimal records: no id, no sid."""
    train = [{"input": "Question: Q1", "add": STEPS[0], "image_path": images[0], "dataset": "ai2d", "accuracy": 0.5},
             {"input": "Question: Q1", "add": "\n\n".join(STEPS[:2]), "image_path": images[0], "dataset": "ai2d",
              "accuracy": 0.25}]
    meta = [{"true_false": True, "input": "Question: Q2\n\n" + "\n\n".join(STEPS) + "\n\nFinal answer: 7",
             "image_path": images[1]},
            {"true_false": "False", "input": "Question: Q3\n\n" + STEPS[0] + "\n\nFinal answer: 8", "image_path": images[2]}]
    (cot,), _ = read(write_json(tmp_path / "train.json", train))
    assert cot["mc"] == [0.5, 0.25] and cot["domain"] == "ai2d" and cot["_format"] == "dreamprm"
    m, _ = read(write_json(tmp_path / "meta.json", meta), "cots")
    assert [r["correct"] for r in m] == [True, False]                  # the string "False" is false
    assert m[0]["final"] == "7" and len(m[0]["steps"]) == 3 and m[0]["_question"] == "Question: Q2"
    meta[1]["true_false"] = "no"
    with pytest.raises(prm.DataError, match="record 1: field 'true_false': 'no' is not a boolean"):
        read(write_json(tmp_path / "meta.json", meta), "cots")


def test_dreamprm_traps(tmp_path, images):
    """'### Step k' prefixes with a dangling '###', the last final answer, list image paths, stepless
    records with missing images, records with several images."""
    heads = [f"### Step {k + 1}: " + s.split(": ", 1)[1] for k, s in enumerate(STEPS)]
    full = "Let's analyze.\n\n" + "\n\n".join(heads)
    prefixes = [full[:full.index("Step 2")].rstrip(), full[:full.index("Step 3")].rstrip(), full]
    assert prefixes[0].endswith("###")
    train = [{"id": 9, "sid": k + 1, "input": "Question: Q9", "add": p, "image_path": [images[0]], "dataset": "m3cot",
              "accuracy": acc} for k, (p, acc) in enumerate(zip(prefixes, [1.0, 0.5, 0.0]))]
    train.append({"id": 10, "sid": 1, "input": "Question: Q10", "add": "", "image_path": "gone.png",
                  "dataset": "m3cot", "accuracy": 1.0})
    train.append(dict(train[0], id=11, image_path=images[:2]))
    records, skips = read(write_json(tmp_path / "train.json", train))
    assert len(records) == 1 and records[0]["mc"] == [1.0, 0.5, 0.0] and records[0]["steps"][0] == heads[0]
    assert sorted(s.reason for s in skips) == ["no steps", "several images"]
    assert prm.skip_report(skips, [r["id"] for r in records]) == \
        "2 of 5 source records skipped (no steps: 1, several images: 1); 2 of 3 questions have no CoT left"
    meta = [{"id": 1, "true_false": False, "input": "Question: Q\n\nStep 1: a\nFinal answer: C\nFinal answer: B",
             "image_path": None}]
    (m,), _ = read(write_json(tmp_path / "meta.json", meta), "cots")
    assert m["pred"] == m["final"] == "B" and m["steps"] == ["Step 1: a"]
    train.append(dict(train[1]))
    with pytest.raises(prm.DataError, match="record 5: duplicate record"):
        read(write_json(tmp_path / "train.json", train))


def test_unknown_format_and_json_list_of_ours(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(prm.DataError) as info:
        read(path)
    msg = str(info.value)
    assert "matches no known format" in msg and "\n" not in msg
    assert all(name in msg for name in prm.FORMATS) and "completions" in msg and "process_correctness" in msg
    ours = {"id": "a", "domain": "d", "question": "q?", "answer": "1", "steps": ["Step 1: x"], "correct": True,
            "mc": [1.0]}
    with pytest.raises(prm.DataError, match="a JSON list of records in our format"):
        read(write_json(tmp_path / "list.json", [ours]))
    with pytest.raises(prm.DataError, match="field 'prompt': missing required field"):
        read(write_jsonl(tmp_path / "t.jsonl", [{"completions": ["a"], "labels": [True]}]), fmt="trl")


def test_same_cots_in_every_format_encode_identically(tmp_path, images, tiny_prm):
    """A round trip: one question with three CoTs written in each format gives identical inputs."""
    cots = [STEPS, STEPS[:2], [STEPS[0], "Step 2: It is 8."]]
    labels = [[1.0, 1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
    img = images[1]
    ours = [{"id": "q", "domain": "d", "question": QUESTION, "answer": "7", "image": img, "sample": k,
             "steps": s, "final": "", "correct": l[-1] == 1.0, "mc": l} for k, (s, l) in enumerate(zip(cots, labels))]
    files = {
        "ours": write_jsonl(tmp_path / "ours.jsonl", ours),
        "trl": write_jsonl(tmp_path / "trl.jsonl", [{"prompt": QUESTION, "completions": s, "images": [img],
                                                     "labels": [x == 1.0 for x in l]} for s, l in zip(cots, labels)]),
        "visualprocessbench": write_jsonl(tmp_path / "vpb.jsonl", [
            {"image": [img], "question": QUESTION, "answer": "7", "data_source": "d",
             "response": {"steps": s, "process_correctness": [1 if x else -1 for x in l]}} for s, l in zip(cots, labels)]),
        "dreamprm": write_json(tmp_path / "dreamprm.json", [
            {"id": k, "sid": i + 1, "input": QUESTION, "add": "\n\n".join(s[:i + 1]), "image_path": img,
             "dataset": "d", "accuracy": l[i]} for k, (s, l) in enumerate(zip(cots, labels)) for i in range(len(s))]),
    }
    encoded = {}
    for fmt, path in files.items():
        records, skips = read(path)
        assert not skips and [r["_format"] for r in records] == [fmt] * 3
        records.sort(key=lambda r: (-len(r["steps"]), r["steps"][-1]))
        assert [r["mc"] for r in records] == labels
        encoded[fmt] = [tiny_prm.encode(r) for r in records]
    for fmt, es in encoded.items():
        for e, e0 in zip(es, encoded["ours"]):
            assert torch.equal(e.input_ids, e0.input_ids) and torch.equal(e.step_ends, e0.step_ends), fmt
            assert torch.equal(e.images["pixel_values"], e0.images["pixel_values"]), fmt


# -- duplicates, leaks and the meta set, as bilevel_train.py and rerank.py see them -------------------

def labels_row(qid, question, image=None, correct=True, sample=0, domain="ai2d"):
    return {"id": qid, "domain": domain, "question": question, "answer": "7", "image": image, "sample": sample,
            "steps": ["Step 1: a", "Step 2: b"], "final": "7", "correct": correct, "mc": [1.0, float(correct)]}


def run_bilevel(args, capsys):
    code = bt.cli(args + ["--model", "tiny", "--iterations", "1", "--unroll-steps", "1", "--train-batch", "2",
                          "--meta-batch", "2"])
    return code, capsys.readouterr()


@pytest.fixture
def train_meta(tmp_path, images):
    train = write_jsonl(tmp_path / "train.jsonl", [labels_row("t1", "Q one?", images[0]),
                                                   labels_row("t2", "Q two?", None, False)])
    meta = write_jsonl(tmp_path / "meta.jsonl", [labels_row("m1", "Q three?", images[1], True),
                                                 labels_row("m2", "Q four?", None, False)])
    return train, meta


@pytest.mark.parametrize("case,words", [
    ("train_twice", "duplicate record: the same record key"),
    ("meta_is_train", "this meta question is also in the training data"),
    ("meta_copied_image", "this meta question is also in the training data"),
    ("one_class_meta", "all 2 usable meta CoTs are correct: the upper loss then has a single target"),
])
def test_duplicates_leaks_and_one_class_meta(tmp_path, images, train_meta, capsys, case, words):
    train, meta = train_meta
    args = ["--train", train, "--meta", meta, "--out", str(tmp_path / "run")]
    if case == "train_twice":
        args = ["--train", train, train, "--meta", meta, "--out", str(tmp_path / "run")]
    elif case == "meta_is_train":
        args[3] = train
    elif case == "meta_copied_image":                      # the same picture under another name is the same image
        shutil.copy(images[0], tmp_path / "copy.png")
        args[3] = write_jsonl(tmp_path / "meta2.jsonl", [labels_row("m9", "Q one?", "copy.png", False),
                                                         labels_row("m2", "Q four?", None, True)])
    else:
        args[3] = write_jsonl(tmp_path / "meta3.jsonl", [labels_row("m1", "Q three?"), labels_row("m2", "Q four?")])
    code, out = run_bilevel(args, capsys)
    assert code == 2 and words in out.err and out.err.count("\n") == 1, out.err
    assert not (tmp_path / "run").exists()                 # stopped before anything was written
    flag = {"meta_is_train": "--allow-overlap", "meta_copied_image": "--allow-overlap",
            "one_class_meta": "--allow-one-class-meta"}.get(case)
    if flag:
        code, out = run_bilevel(args + [flag], capsys)
        assert code == 0, out.err


def test_same_question_text_with_another_image_is_no_leak(tmp_path, images, train_meta, capsys):
    train, _ = train_meta
    meta = write_jsonl(tmp_path / "m.jsonl", [labels_row("m1", "Q one?", images[2]), labels_row("m2", "Q x?", None, False)])
    code, out = run_bilevel(["--train", train, "--meta", meta, "--out", str(tmp_path / "run")], capsys)
    assert code == 0, out.err


def test_final_answer_rule_is_stored_and_applied(tmp_path, images, capsys):
    """Published training prefixes carry no answer line: the run drops it everywhere, and the PRM
    directory tells rerank.py to do the same."""
    train = [{"id": q, "sid": 1, "input": f"Question: Q{q}", "add": STEPS[0], "image_path": images[0],
              "dataset": d, "accuracy": 0.5} for q, d in [(1, "ai2d"), (2, "m3cot")]]
    meta = [{"id": q, "true_false": q == 3, "input": f"Question: Q{q}\n\n{STEPS[0]}\n\nFinal answer: 7",
             "image_path": images[1]} for q in (3, 4)]
    args = ["--train", write_json(tmp_path / "train.json", train), "--meta", write_json(tmp_path / "meta.json", meta),
            "--out", str(tmp_path / "run")]
    code, out = run_bilevel(args, capsys)
    assert code == 0, out.err
    assert json.load(open(tmp_path / "run" / "config.json"))["final_answer"] == "drop"
    assert json.load(open(tmp_path / "run" / "prm" / "prm.json"))["final_answer"] == "drop"
    model = prm.PRM.from_pretrained(str(tmp_path / "run"))
    (m, _), _ = prm.read_cots(str(tmp_path / "meta.json"), "cots")
    assert model.final_answer == "drop"
    assert torch.equal(model.encode(m).input_ids, prm.encode_cot(model.tokenizer, m["_question"], m["steps"], "",
                                                                 m["_image"], model.image_processor,
                                                                 family=model.family).input_ids)


def test_rerank_refuses_duplicate_cots(tmp_path, backbone_dir, capsys):
    row = labels_row("q", "Q?", None)
    path = write_jsonl(tmp_path / "test.jsonl", [row, dict(row, sample=1), dict(row)])
    code = prm.run_cli(rerank.main, ["--cots", path, "--prm", backbone_dir, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "test.jsonl:3: duplicate record: the same question id and sample 'ai2d/q#0'" in err


# -- the public PRM datasets, each to its published layout ----------------------------------------

def prm800k_row(steps, ratings, finish="solution", error=None, human_at=None):
    """One PRM800K line: each step a singleton completion, chosen; `error` (a text) ends the
    trajectory with an unchosen completion rated -1, as phase 2 stops at the first error."""
    label_steps = []
    for k, (s, r) in enumerate(zip(steps, ratings)):
        if k == human_at:                                # phase 1: all rated -1, the labeler wrote their own
            label_steps.append({"completions": [{"text": "a wrong try", "rating": -1, "flagged": None}],
                                "human_completion": {"text": s, "rating": None}, "chosen_completion": None})
        else:
            label_steps.append({"completions": [{"text": s, "rating": r, "flagged": None}],
                                "human_completion": None, "chosen_completion": 0})
    if error:
        label_steps.append({"completions": [{"text": error, "rating": -1, "flagged": False}],
                            "human_completion": None, "chosen_completion": None})
    return {"labeler": "x", "timestamp": "2023-01-22T04:34:27", "generation": 9, "is_quality_control_question": False,
            "is_initial_screening_question": False,
            "question": {"problem": QUESTION, "ground_truth_answer": "7", "pre_generated_steps": steps},
            "label": {"steps": label_steps, "total_time": 1000, "finish_reason": finish}}


def test_prm800k_native(tmp_path):
    rows = [prm800k_row(STEPS[:2] + ["So the sum is 7.\n\n# Answer\n\n7"], [0, 1, 1]),
            prm800k_row(STEPS[:2], [1, 0], "found_error", error="Step 3: The sum is 8."),
            prm800k_row(STEPS, [1, 1, 1], human_at=1),
            prm800k_row(STEPS[:1], [1], "give_up"), prm800k_row(STEPS[:1], [1], "bad_problem")]
    records, skips = read(write_jsonl(tmp_path / "phase2_train.jsonl", rows), "cots")
    a, b, c = records
    assert {r["_format"] for r in records} == {"prm800k"} and a["answer"] == "7"
    assert a["mc"] == [None, 1.0, 1.0] and a["correct"] is True and a["pred"] == "7"     # neutral: unlabelled
    assert b["mc"] == [1.0, None, 0.0] and b["correct"] is False and b["steps"][-1] == "Step 3: The sum is 8."
    assert c["mc"] == [1.0, 1.0, 1.0] and c["steps"][1] == STEPS[1]                      # the human step, +1
    assert sorted(s.reason for s in skips) == ["finish_reason bad_problem: no outcome", "finish_reason give_up: no outcome"]


def test_math_shepherd_native(tmp_path):
    tag = prm.MATH_SHEPHERD_TAG
    steps = ["Step 1: Read 3 and 4.", "Step 2: 3 + 4 = 7.", "Step 3: The answer is: 7"]
    text = QUESTION + " " + " ".join(s + " " + tag for s in steps)
    wrong = text.replace("= 7.", "= 8.").replace("is: 7", "is: 8")
    rows = [{"input": text, "label": text.replace(tag, "+"), "task": "GSM8K"},
            {"input": wrong, "label": wrong.replace(tag, "+", 1).replace(tag, "-"), "task": "GSM8K"}]
    records, _ = read(write_jsonl(tmp_path / "math-shepherd.jsonl", rows), "cots")
    a, b = records
    assert a["_format"] == "mathshepherd" and a["question"] == QUESTION and a["steps"] == steps
    assert a["mc"] == [1.0, 1.0, 1.0] and a["correct"] is True and a["pred"] == "7" and a["domain"] == "GSM8K"
    assert b["mc"] == [1.0, 0.0, 0.0] and b["correct"] is False
    rows[0]["label"] = text.replace(tag, "?")
    with pytest.raises(prm.DataError, match="field 'label': no '\\+' or '-' where input has its tag 1"):
        read(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_processbench(tmp_path):
    rows = [{"id": "gsm8k-0", "generator": "Qwen2-7B", "problem": QUESTION, "steps": STEPS, "final_answer_correct": False,
             "label": 1},
            {"id": "gsm8k-1", "generator": "Qwen2-7B", "problem": QUESTION, "steps": STEPS, "final_answer_correct": True,
             "label": -1}]
    records, _ = read(write_json(tmp_path / "gsm8k.json", rows), "cots")
    a, b = records
    assert a["_format"] == "processbench" and a["mc"] == [1.0, 0.0, None] and a["correct"] is False
    assert b["mc"] == [1.0, 1.0, 1.0] and b["correct"] is True and a["id"] == "gsm8k-0" and a["policy"] == "Qwen2-7B"
    rows[0]["label"] = 3
    with pytest.raises(prm.DataError, match="record 0: field 'label': 3 is not -1 or a step index below 3"):
        read(write_json(tmp_path / "gsm8k.json", rows))


SYSTEM = "You are an advanced AI assistant, designed to serve as a process supervision model."


def test_dreamprm15_meta_set(tmp_path, images):
    """The published layout: a JSON list beside data/meta_images/, image paths '../data/meta_images/..',
    true_false as a bool or as the string 'True'/'False', conversations as a list or as a Python literal."""
    (tmp_path / "data" / "meta_images").mkdir(parents=True)
    shutil.copy(images[0], tmp_path / "data" / "meta_images" / "test_Art_113.png")
    turns = [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "### Question:\nQuestion: <image 1> Who?"
                                                                            "\n\nOptions: (A) x (B) y"},
             {"from": "human", "value": "Look at the painting."}, {"from": "gpt", "value": "+"},
             {"from": "human", "value": "Answer: B"}, {"from": "gpt", "value": "+"}]
    rows = [{"id": "test_Art_113", "response": "Look at the painting.\n\nAnswer: B", "true_false": False,
             "image": "../data/meta_images/test_Art_113.png", "conversations": turns},
            {"id": "test_Art_114", "response": "B", "true_false": "True", "image": "../data/meta_images/test_Art_113.png",
             "conversations": repr(turns[:2] + turns[4:])}]
    records, _ = read(write_json(tmp_path / "data" / "meta_MMMU_Pro.json", rows), "cots")
    a, b = records
    assert a["_format"] == "dreamprm15" and a["question"] == "Question: <image 1> Who?\n\nOptions: (A) x (B) y"
    assert a["steps"] == ["Look at the painting.", "Answer: B"] and a["correct"] is False and a["pred"] == "B"
    assert b["correct"] is True and b["steps"] == ["Answer: B"] and "mc" not in a       # its '+' are no labels
    assert a["_image"] == str(tmp_path / "data" / "meta_images" / "test_Art_113.png")
    twice, _ = read(write_json(tmp_path / "data" / "meta_MMMU_Pro.json", rows + rows[:1]), "cots")   # as published
    assert [r["sample"] for r in twice] == [0, 0, 1] and len({r["_key"] for r in twice}) == 3
    rows[1]["conversations"] = "__import__('os').system('true')"                        # parsed, never run
    with pytest.raises(prm.DataError, match="record 1: field 'conversations': not a list of turns"):
        read(write_json(tmp_path / "data" / "meta_MMMU_Pro.json", rows), "cots")


def test_visualprm400k_both_layouts(tmp_path, images):
    v11 = [{"image": images[0], "question": QUESTION, "answer": "7", "response": "\n\n".join(STEPS),
            "steps_with_score": [{"step": s, "score": x} for s, x in zip(STEPS, [1.0, 0.625, 0.0])],
            "num_mc_sequences": 16}]
    (a,), _ = read(write_jsonl(tmp_path / "ai2d.jsonl", v11))
    assert a["_format"] == "visualprm400k" and a["mc"] == [1.0, 1.0, 0.0] and a["correct"] is None   # score > 0
    assert a["domain"] == "ai2d" and a["_image"] == images[0]
    turns = [{"from": "system", "value": SYSTEM},
             {"from": "human", "value": f"<image>\n### Question:\n{QUESTION}\n\n### Solution Process:\n{STEPS[0]}"},
             {"from": "gpt", "value": "+"}, {"from": "human", "value": STEPS[1]}, {"from": "gpt", "value": "-"}]
    (b,), _ = read(write_jsonl(tmp_path / "v10.jsonl", [{"image": images[0], "conversations": turns}]),
                   correct_from="last-label")
    assert b["_format"] == "visualprm400k" and b["question"] == QUESTION and b["steps"] == STEPS[:2]
    assert b["mc"] == [1.0, 0.0] and b["correct"] is False


def test_rlhflow(tmp_path):
    turns = [{"role": "user", "content": f"{QUESTION} {STEPS[0]}"}, {"role": "assistant", "content": "+"},
             {"role": "user", "content": STEPS[1]}, {"role": "assistant", "content": "+"}]
    (a,), _ = read(write_jsonl(tmp_path / "mistral.jsonl", [{"conversations": turns}]))
    assert a["_format"] == "rlhflow" and a["question"] == QUESTION and a["steps"] == STEPS[:2]
    assert a["mc"] == [1.0, 1.0] and a["correct"] is None
    turns[1]["content"] = "maybe"
    with pytest.raises(prm.DataError, match="mistral.jsonl:1: field 'conversations': assistant turn 'maybe'"):
        read(write_jsonl(tmp_path / "mistral.jsonl", [{"conversations": turns}]))


def test_detection_names_the_nearest_format(tmp_path):
    """A PRM800K line is PRM800K (it has a question too, as ours does); a record that fits no format
    is named against the nearest one and the fields it lacks."""
    assert prm.detect_format("lines", [(1, prm800k_row(STEPS, [1, 1, 1]))], "x") == "prm800k"
    with pytest.raises(prm.DataError) as info:
        read(write_jsonl(tmp_path / "x.jsonl", [{"problem": QUESTION, "steps": STEPS, "label": 1}]))
    assert "nearest: processbench, which needs final_answer_correct" in str(info.value)


def test_dreamprm_preamble_answer_line_and_stepless_train(tmp_path):
    """The policy's opening sentence is no part of the question; pred is the answer line alone; a
    train prefix without step markers is one labelled step."""
    meta = [{"id": 3, "true_false": True, "image_path": None, "input": "Question: Q3?\nOptions: (A) 1 (B) 2\n\n"
             "Let's analyze the question step by step:\n\n### Step 1: Think\nIt is B.\n\nFinal answer: B\n\n"
             "(Note: Since the image details are not provided, this is a guess.)"},
            {"id": 4, "true_false": False, "image_path": None, "input": "Question: Q4?\n\nLet's solve this step by "
             "step.\n\nStep 1: It is 5.\n\nFinal answer: 5"}]
    a, b = read(write_json(tmp_path / "meta.json", meta), "cots")[0]
    assert a["question"] == "Question: Q3?\nOptions: (A) 1 (B) 2" and a["pred"] == "B"
    assert b["question"] == "Question: Q4?" and b["pred"] == "5"
    train = [{"input": "Question: Q5?", "add": "Let's solve this problem using Python code.\n```python\nprint(5)\n```",
              "image_path": None, "dataset": "code", "accuracy": 0.75}]
    (c,), skips = read(write_json(tmp_path / "train.json", train))
    assert not skips and c["steps"] == [train[0]["add"]] and c["mc"] == [0.75]


def test_text_formats_encode_identically(tmp_path, tiny_prm):
    """A round trip for the text-only formats: the same CoTs in each give identical inputs."""
    tag = prm.MATH_SHEPHERD_TAG
    cots, labels = [STEPS, STEPS[:2] + ["Step 3: The sum is 8."]], [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    turns = lambda s, l: [t for x, y in zip([f"{QUESTION} {s[0]}"] + s[1:], l)  # noqa: E731
                          for t in ({"role": "user", "content": x}, {"role": "assistant", "content": "+-"[y == 0.0]})]
    files = {
        "trl": write_jsonl(tmp_path / "trl.jsonl", [{"prompt": QUESTION, "completions": s, "labels": l}
                                                    for s, l in zip(cots, labels)]),
        "prm800k": write_jsonl(tmp_path / "prm800k.jsonl", [prm800k_row(STEPS, [1, 1, 1]), prm800k_row(
            STEPS[:2], [1, 1], "found_error", error="Step 3: The sum is 8.")]),
        "mathshepherd": write_jsonl(tmp_path / "ms.jsonl", [
            {"input": QUESTION + " " + " ".join(x + " " + tag for x in s),
             "label": QUESTION + " " + " ".join(x + " " + "+-"[y == 0.0] for x, y in zip(s, l))}
            for s, l in zip(cots, labels)]),
        "processbench": write_jsonl(tmp_path / "pb.jsonl", [
            {"id": f"p{k}", "problem": QUESTION, "steps": s, "final_answer_correct": l[-1] == 1.0,
             "label": l.index(0.0) if 0.0 in l else -1} for k, (s, l) in enumerate(zip(cots, labels))]),
        "rlhflow": write_jsonl(tmp_path / "rl.jsonl", [{"conversations": turns(s, l)} for s, l in zip(cots, labels)]),
    }
    encoded = {}
    for fmt, path in files.items():
        records, skips = read(path)
        assert not skips and [r["_format"] for r in records] == [fmt] * 2
        assert [r["mc"] for r in records] == labels, fmt
        encoded[fmt] = [tiny_prm.encode(r) for r in records]
    for fmt, es in encoded.items():
        for e, e0 in zip(es, encoded["trl"]):
            assert torch.equal(e.input_ids, e0.input_ids) and torch.equal(e.step_ends, e0.step_ends), fmt


# -- benchmark numbers as the benchmarks compute them ----------------------------------------------

def judged_report(rows, threshold=0.5):
    """benchmark_report over (format, subset, mc, values) rows, as rerank.py sums them."""
    from collections import Counter
    judged = {}
    for fmt, subset, mc, v in rows:
        rerank.add_step_counts(Counter(), judged, [{"_format": fmt, "domain": subset, "mc": mc}], [v])
    return rerank.benchmark_report(judged, threshold)


def official_processbench(subsets):
    """ProcessBench's evaluation (code/run_eval.py of the ProcessBench repository, and the paper,
    arXiv 2412.06559, section 4.1): per subset acc1 = mean match on erroneous samples, acc2 = on
    correct ones, f1 = 2 acc1 acc2 / (acc1 + acc2); the overall figure is the mean over subsets."""
    f1s = []
    for matches_err, matches_ok in subsets:
        acc1, acc2 = sum(matches_err) / len(matches_err), sum(matches_ok) / len(matches_ok)
        f1s.append(2 * acc1 * acc2 / (acc1 + acc2))
    return f1s, sum(f1s) / len(f1s)


def test_processbench_f1_is_the_mean_of_the_subsets_f1s():
    """ProcessBench reports F1 per subset and their plain mean (the paper's 'Avg.'), not the F1 of
    all records pooled. Two subsets of unequal size and difficulty."""
    hit_err, miss_err = ([0.9, 0.1], [1.0, 0.0]), ([0.9, 0.9], [1.0, 0.0])
    hit_ok, miss_ok = ([0.9, 0.9], [1.0, 1.0]), ([0.9, 0.1], [1.0, 1.0])
    gsm = [hit_err, hit_err, miss_err, hit_ok, miss_ok]             # acc1 2/3, acc2 1/2
    math_ = [miss_err, miss_err, hit_err, hit_err, hit_ok, hit_ok, hit_ok, miss_ok, miss_ok, miss_ok]   # 2/4, 3/6
    rows = [("processbench", "gsm8k", mc, v) for v, mc in gsm] + [("processbench", "math", mc, v) for v, mc in math_]
    b = judged_report(rows)
    f1s, mean = official_processbench([([1, 1, 0], [1, 0]), ([0, 0, 1, 1], [1, 1, 1, 0, 0, 0])])
    assert abs(b["subsets"]["gsm8k"]["f1"] - f1s[0]) < 1e-12 and abs(b["subsets"]["math"]["f1"] - f1s[1]) < 1e-12
    assert abs(b["processbench_f1"] - mean) < 1e-12
    pooled = 2 * (4 / 7) * (4 / 8) / (4 / 7 + 4 / 8)
    assert abs(b["processbench_f1"] - pooled) > 1e-3                 # the pooled figure differs


def test_processbench_subset_is_read_from_the_record(tmp_path):
    """The record's subset names the row: a subset field, else its own id ('gsm8k-0'), else the file."""
    rows = [{"id": f"{name}-{k}", "generator": "g", "problem": f"{name} {k}?", "steps": STEPS, "label": -1,
             "final_answer_correct": True} for name in ("gsm8k", "math") for k in range(2)]
    rows.append(dict(rows[0], id="x", problem="other?"))
    rows.append(dict(rows[0], id="y", problem="named?", subset="omnimath"))
    records, _ = read(write_json(tmp_path / "processbench.json", rows), "cots")
    assert [r["domain"] for r in records] == ["gsm8k", "gsm8k", "math", "math", "processbench", "omnimath"]


def test_processbench_tie_unscored_neutral_and_undefined():
    """ProcessBench counts steps above the threshold as correct (its section 4.1): a tie at the
    threshold is flagged. Its denominators count every sample, so an unscored CoT is a miss. With
    both accuracies 0 its F1 is nan: reported as undefined. A neutral step (PRM800K rating 0, label
    None) adds nothing: flagging it is no miss."""
    tie = judged_report([("processbench", "s", [1.0, 0.0], [0.9, 0.5]), ("processbench", "s", [1.0, 1.0], [0.9, 0.6])])
    assert tie["subsets"]["s"]["erroneous_accuracy"] == 1.0 and tie["subsets"]["s"]["correct_accuracy"] == 1.0
    long = judged_report([("processbench", "s", [1.0, 0.0], [0.9, 0.1]), ("processbench", "s", [1.0, 0.0], None),
                          ("processbench", "s", [1.0, 1.0], [0.9, 0.9])])
    assert long["subsets"]["s"]["erroneous_accuracy"] == 0.5 and long["unscored"] == 1 and long["erroneous"] == 2
    zero = judged_report([("processbench", "s", [1.0, 0.0], [0.9, 0.9]), ("processbench", "s", [1.0, 1.0], [0.1, 0.9])])
    assert zero["subsets"]["s"]["f1"] is None and zero["processbench_f1"] is None
    assert "| - |" in rerank.benchmark_markdown({"p": zero})
    neutral = judged_report([("prm800k", "p", [None, 1.0, 0.0], [0.1, 0.9, 0.1]),
                             ("prm800k", "p", [1.0, None, 1.0], [0.9, 0.2, 0.9])])
    assert neutral["subsets"]["p"]["erroneous_accuracy"] == 1.0 and neutral["subsets"]["p"]["correct_accuracy"] == 1.0


def test_math_shepherd_odd_records_are_skipped_not_fatal(tmp_path):
    """Math-Shepherd holds records with no 'Step 1' marker and records with a step tag inside the
    question (TRL's own Math-Shepherd converter special-cases both): each is skipped with its reason,
    the file read on."""
    tag = prm.MATH_SHEPHERD_TAG
    steps = ["Step 1: Read 3 and 4.", "Step 2: The answer is: 7"]
    good = QUESTION + " " + " ".join(s + " " + tag for s in steps)
    no_marker = "How much? First, 3 + 4 = 7. " + tag + " The answer is: 7 " + tag
    tag_in_question = f"Half of it {tag} is what? Step 1: 2. {tag} Step 2: The answer is: 2 {tag}"
    rows = [{"input": x, "label": x.replace(tag, "+"), "task": "GSM8K"} for x in (good, no_marker, tag_in_question)]
    records, skips = read(write_jsonl(tmp_path / "math-shepherd.jsonl", rows))
    assert len(records) == 1 and records[0]["steps"] == steps
    assert sorted(s.reason for s in skips) == ["a step tag inside the question (before 'Step 1')",
                                               "no 'Step 1' marker (the question cannot be told from the first step)"]


def test_visualprm400k_versions_read_as_one_quantity(tmp_path, images):
    """VisualPRM400K v1.0 is v1.1 post-processed: '+' wherever the MC score is above 0, and '<image>'
    taken out of the question. Both versions of one CoT read the same: question and labels."""
    scores = [1.0, 0.125, 0.0]
    v11 = [{"image": images[0], "question": "<image>\n" + QUESTION, "answer": "7", "response": "\n\n".join(STEPS),
            "steps_with_score": [{"step": s, "score": x} for s, x in zip(STEPS, scores)]}]
    turns = [{"from": "human", "value": f"<image>\n### Question:\n{QUESTION}\n\n### Solution Process:\n{STEPS[0]}"},
             {"from": "gpt", "value": "+"}]
    for s, x in zip(STEPS[1:], scores[1:]):
        turns += [{"from": "human", "value": s}, {"from": "gpt", "value": "+" if x > 0 else "-"}]
    (a,), _ = read(write_jsonl(tmp_path / "v11.jsonl", v11))
    (b,), _ = read(write_jsonl(tmp_path / "v10.jsonl", [{"image": images[0], "conversations": turns}]))
    assert a["question"] == b["question"] == QUESTION and a["steps"] == b["steps"] == STEPS
    assert a["mc"] == b["mc"] == [1.0, 1.0, 0.0]


def test_rerank_reports_processbench_per_subset_and_names_human_labels(tmp_path, backbone_dir, capsys):
    rows = [{"id": f"{name}-{k}", "generator": "g", "problem": f"{name} {k}?", "steps": STEPS,
             "final_answer_correct": k % 2 == 0, "label": -1 if k % 2 == 0 else 1} for name in ("gsm8k", "math")
            for k in range(2)]
    path = write_json(tmp_path / "pb.json", rows)
    model_dir = str(tmp_path / "prm")
    prm.PRM.from_backbone(backbone_dir).save_pretrained(model_dir)
    assert rerank.main(["--cots", path, "--prm", model_dir, "--names", "p", "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "against the human step labels" in md and "MC labels" not in md
    assert "| p | gsm8k | 1 |" in md and "| p | math | 1 |" in md and "mean of the 2 subsets in this file" in md
    b = json.load(open(tmp_path / "out" / "results.json"))["benchmark_step_level"]["p"]
    f1s = [b["subsets"][s]["f1"] for s in ("gsm8k", "math")]
    assert b["processbench_f1"] == (None if None in f1s else sum(f1s) / 2)
