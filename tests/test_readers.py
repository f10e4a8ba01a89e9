"""Every field each format reader uses is checked: missing, null or of the wrong type is one line
naming the field (or, where the format allows it, the field's default), never a silent read or a
traceback. Records are built to each format's published schema with one field changed."""
import copy
import json
import re

import pytest

import prm

Q = "What is the sum of the two numbers?"
STEPS = ["Step 1: Read 3 and 4.", "Step 2: 3 + 4 = 7.", "Step 3: The answer is: 7"]
TAG = prm.MATH_SHEPHERD_TAG
SHEPHERD = Q + " " + " ".join(s + " " + TAG for s in STEPS)
TURNS = [{"role": "user", "content": f"{Q} {STEPS[0]}"}, {"role": "assistant", "content": "+"},
         {"role": "user", "content": STEPS[1]}, {"role": "assistant", "content": "-"}]
HUMAN_TURNS = [{"from": "human", "value": f"### Question:\n{Q}\n\n### Solution Process:\n{STEPS[0]}"},
               {"from": "gpt", "value": "+"}, {"from": "human", "value": STEPS[1]}, {"from": "gpt", "value": "+"}]


def valid(fmt, image):
    """One record of each format, as its published files write it (IMAGE: a path in the test folder)."""
    completion = lambda text, rating: {"text": text, "rating": rating, "flagged": None}  # noqa: E731
    return {
        "ours": {"id": "q1", "domain": "d", "question": Q, "answer": "7", "image": image, "choices": ["7", "8"],
                 "sample": 0, "steps": STEPS, "final": "7", "pred": "7", "correct": True, "mc": [1.0, 1.0, 1.0]},
        "trl": {"prompt": Q, "completions": STEPS, "labels": [True, True, False], "image": image, "answer": "7",
                "domain": "d"},
        "visualprocessbench": {"image": [image], "question": Q, "answer": "7", "data_source": "MathVerse",
                               "policy_model": "InternVL2.5-8B",
                               "response": {"steps": STEPS, "process_correctness": [1, 0, -1]}},
        "prm800k": {"question": {"problem": Q, "ground_truth_answer": "7"},
                    "label": {"finish_reason": "solution",
                              "steps": [{"completions": [completion(s, 1), completion(s + " No.", -1)],
                                         "human_completion": None, "chosen_completion": 0} for s in STEPS]}},
        "mathshepherd": {"input": SHEPHERD, "label": SHEPHERD.replace(TAG, "+"), "task": "GSM8K"},
        "processbench": {"id": "gsm8k-0", "generator": "Qwen2-7B", "problem": Q, "steps": STEPS, "label": 1,
                         "final_answer_correct": False},
        "dreamprm": {"id": 3, "sid": 1, "input": Q, "add": STEPS[0], "accuracy": 0.75, "dataset": "ai2d",
                     "image_path": image, "ground_truth": "7"},
        "dreamprm15": {"id": "x1", "true_false": "True", "image": image, "dataset": "MMMU", "response": "7",
                       "conversations": HUMAN_TURNS},
        "visualprm400k": {"image": image, "question": "<image>\n" + Q, "answer": "7", "source": "ai2d",
                          "steps_with_score": [{"step": s, "score": x} for s, x in zip(STEPS, [1.0, 0.5, 0.0])]},
        "rlhflow": {"conversations": TURNS},
    }[fmt]


# (format, field path, required, a value of the wrong type). A required field missing, null or of the
# wrong type is an error naming it; an optional one may be missing or null, never of the wrong type.
FIELDS = [
    ("ours", "id", True, [1]), ("ours", "domain", True, 5), ("ours", "question", True, 5),
    ("ours", "answer", True, [7]), ("ours", "steps", True, "x"), ("ours", "steps[0]", True, 5),
    ("ours", "mc", True, "x"), ("ours", "mc[0]", False, "1"), ("ours", "image", False, 5),
    ("ours", "choices", False, "7"), ("ours", "final", False, 5), ("ours", "pred", False, 5),
    ("ours", "correct", False, "yes"),
    ("trl", "prompt", True, 5), ("trl", "completions", True, "x"), ("trl", "completions[0]", True, 5),
    ("trl", "labels", True, "x"), ("trl", "labels[0]", True, "yes"), ("trl", "image", False, 5),
    ("trl", "answer", False, [7]), ("trl", "domain", False, 5),
    ("visualprocessbench", "question", True, 5), ("visualprocessbench", "answer", True, [7]),
    ("visualprocessbench", "response", True, 5), ("visualprocessbench", "response.steps", True, "x"),
    ("visualprocessbench", "response.process_correctness", True, "x"),
    ("visualprocessbench", "response.process_correctness[0]", True, "1"), ("visualprocessbench", "image", False, 5),
    ("visualprocessbench", "data_source", False, 5), ("visualprocessbench", "policy_model", False, 5),
    ("prm800k", "question", True, "x"), ("prm800k", "question.problem", True, 5),
    ("prm800k", "question.ground_truth_answer", False, [7]), ("prm800k", "label", True, "x"),
    ("prm800k", "label.finish_reason", True, 5), ("prm800k", "label.steps", True, "x"),
    ("prm800k", "label.steps[0]", True, "x"), ("prm800k", "label.steps[0].completions", True, "x"),
    ("prm800k", "label.steps[0].completions[0]", True, "x"),
    ("prm800k", "label.steps[0].completions[0].text", True, 5),
    ("prm800k", "label.steps[0].completions[0].rating", False, "1"),
    ("prm800k", "label.steps[0].chosen_completion", False, "0"),
    ("prm800k", "label.steps[0].human_completion", False, 5),
    ("mathshepherd", "input", True, 5), ("mathshepherd", "label", True, 5), ("mathshepherd", "task", False, 5),
    ("processbench", "id", False, [1]), ("processbench", "generator", False, 5), ("processbench", "problem", True, 5),
    ("processbench", "steps", True, "x"), ("processbench", "steps[0]", True, 5), ("processbench", "label", True, "1"),
    ("processbench", "final_answer_correct", True, 5),
    ("dreamprm", "id", False, [3]), ("dreamprm", "input", True, 5), ("dreamprm", "add", True, 5),
    ("dreamprm", "accuracy", True, "1"), ("dreamprm", "dataset", True, 5), ("dreamprm", "image_path", False, 5),
    ("dreamprm", "ground_truth", False, [7]),
    ("dreamprm15", "conversations", True, 5), ("dreamprm15", "conversations[0]", True, "x"),
    ("dreamprm15", "conversations[0].value", True, 5), ("dreamprm15", "true_false", True, 5),
    ("dreamprm15", "image", False, 5), ("dreamprm15", "id", False, [1]), ("dreamprm15", "dataset", False, 5),
    ("visualprm400k", "question", True, 5), ("visualprm400k", "steps_with_score", True, "x"),
    ("visualprm400k", "steps_with_score[0]", True, "x"), ("visualprm400k", "steps_with_score[0].step", True, 5),
    ("visualprm400k", "steps_with_score[0].score", True, "1"), ("visualprm400k", "image", False, 5),
    ("visualprm400k", "answer", False, [7]), ("visualprm400k", "source", False, 5),
    ("rlhflow", "conversations", True, 5), ("rlhflow", "conversations[0]", True, "x"),
    ("rlhflow", "conversations[0].content", True, 5), ("rlhflow", "conversations[1].content", True, 5),
]


def change(record, path, value):
    """The record with the field at `path` ('a.b[0].c') set to value, or removed (value is DELETE)."""
    record = copy.deepcopy(record)
    keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
    parent = record
    for k in keys[:-1]:
        parent = parent[k]
    if value is DELETE:
        del parent[keys[-1]]
    else:
        parent[keys[-1]] = value
    return record


DELETE = object()


@pytest.mark.parametrize("fmt", sorted({f for f, *_ in FIELDS}))
def test_each_format_reads_its_valid_record(tmp_path, images, fmt):
    (rec,), skips = read_labels_or_cots(tmp_path, fmt, valid(fmt, images[0]))
    assert not skips and rec["steps"] and rec["_format"] == fmt and rec["_question"].strip()
    assert fmt == "dreamprm15" or len(rec["mc"]) == len(rec["steps"])


@pytest.mark.parametrize("fmt,path,required,wrong", FIELDS, ids=[f"{f}:{p}" for f, p, _, _ in FIELDS])
def test_a_field_missing_null_or_of_the_wrong_type(tmp_path, images, fmt, path, required, wrong):
    """Required: missing, null and wrong type are each one DataError naming the field. Optional:
    missing and null read (as a record or a skip with its reason), a wrong type is an error."""
    base = valid(fmt, images[0])
    name = re.findall(r"[^.\[\]]+", path)[-1]
    name = re.findall(r"[^.\[\]]+", path)[-2] if name.isdigit() else name
    entry = path.endswith("]")              # a list entry can be null, never absent
    cases = [("wrong", wrong)] + ([("null", None)] + ([] if entry else [("missing", DELETE)]) if required else [])
    for what, value in cases:
        with pytest.raises(prm.DataError) as info:
            read_labels_or_cots(tmp_path, fmt, change(base, path, value))
        message = str(info.value)
        assert "\n" not in message and ("data.json" in message) and name in message, (what, message)
    if not required:
        for value in (None,) if entry else (DELETE, None):
            records, skips = read_labels_or_cots(tmp_path, fmt, change(base, path, value))
            assert len(records) + len(skips) == 1


def read_labels_or_cots(tmp_path, fmt, record):
    """Meta formats (no step labels) are read as CoTs, the others as training labels."""
    path = tmp_path / ("data.json" if fmt == "dreamprm" else "data.jsonl")
    path.write_text(json.dumps([record]) if fmt == "dreamprm" else json.dumps(record) + "\n")
    kind = "cots" if fmt == "dreamprm15" else "labels"
    return prm.read_cots(str(path), kind, fmt=fmt, correct_from="last-label")


def test_the_cases_a_user_met(tmp_path, images):
    """Each record that was read silently or crashed, now one line naming file, line and field."""
    image = images[0]
    cases = [
        ("prm800k", change(valid("prm800k", image), "label.steps[1].completions[0].rating", 2),
         "label.steps[1].completions[0].rating': rating 2 is not -1, 0, 1 or null"),
        ("prm800k", change(valid("prm800k", image), "label.steps[1].completions[0].rating", "1"),
         "rating '1' is not -1, 0, 1 or null"),
        ("prm800k", change(valid("prm800k", image), "label.steps[0].completions", {"text": STEPS[0]}),
         "label.steps[0].completions': wrong type dict"),
        ("prm800k", change(valid("prm800k", image), "label.steps[2].completions[0].text", 7),
         "label.steps[2].completions[0].text': wrong type int"),
        ("processbench", change(valid("processbench", image), "id", ["gsm8k-0"]), "field 'id': wrong type list"),
        ("mathshepherd", change(valid("mathshepherd", image), "label",
                                SHEPHERD.replace("3 and 4", "5 and 6").replace(TAG, "+")),
         "field 'label': its text differs from input's at character"),
        ("dreamprm15", change(valid("dreamprm15", image), "true_false", DELETE), "field 'true_false': missing"),
        ("dreamprm15", change(valid("dreamprm15", image), "conversations[2].value", DELETE),
         "field 'conversations[2]': a turn needs from/value"),
        ("visualprm400k", change(valid("visualprm400k", image), "steps_with_score", STEPS),
         "field 'steps_with_score[0]': must be an object"),
        ("rlhflow", change(valid("rlhflow", image), "conversations[2].content", None),
         "field 'conversations[2].content': null where a value is required"),
        ("rlhflow", change(valid("rlhflow", image), "conversations[2].content", 7),
         "field 'conversations[2].content': wrong type int"),
        ("trl", change(valid("trl", image), "prompt", [{"role": "user", "content": None}]),
         "field 'prompt[0].content': null where a value is required"),
        ("dreamprm15", valid("visualprm400k", image), "field 'conversations': missing required field"),
    ]
    for fmt, record, words in cases:
        with pytest.raises(prm.DataError) as info:
            read_labels_or_cots(tmp_path, fmt, record)
        assert words in str(info.value) and "data.json" in str(info.value), (fmt, str(info.value))
        if fmt != "dreamprm":
            assert ":1: " in str(info.value)


def test_a_math_shepherd_label_longer_than_its_input_is_refused(tmp_path, images):
    record = change(valid("mathshepherd", images[0]), "label", SHEPHERD.replace(TAG, "+") + " extra")
    with pytest.raises(prm.DataError, match="field 'label': it goes on past input's end"):
        read_labels_or_cots(tmp_path, "mathshepherd", record)
