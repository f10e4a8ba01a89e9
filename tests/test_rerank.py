"""rerank.py: select_best against a brute-force loop, majority ties, published meta files."""
import json
import random

import torch

import prm
import rerank
from test_prm import write_published


def majority_vote(preds):
    """The CoT a self-consistency vote picks: the first CoT of the first most-voted answer."""
    return prm.top_answers(preds)[0][0]


def score_cots(model, records, how, batch_size=16, shared_prefix=True):
    """rerank.score_question over the questions of a list of records; results in the records' order."""
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault((r["domain"], r["id"]), []).append(i)
    scores, values = [None] * len(records), [None] * len(records)
    for idx in groups.values():
        s, v = rerank.score_question(model, [records[i] for i in idx], how, batch_size, shared_prefix)
        for i, x, y in zip(idx, s, v):
            scores[i], values[i] = x, y
    return scores, values


def test_select_best_matches_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        Q, N = rng.randint(1, 6), rng.randint(1, 8)
        scores = torch.tensor([[rng.choice([0.1, 0.5, 0.9, rng.random()]) for _ in range(N)] for _ in range(Q)])
        mask = torch.tensor([[j < rng.randint(1, N) or j == 0 for j in range(N)] for _ in range(Q)])
        best = rerank.select_best(scores.masked_fill(~mask, float("-inf")))
        for q in range(Q):
            brute, top = None, None
            for j in range(N):
                if mask[q, j] and (top is None or scores[q, j] > top):
                    brute, top = j, scores[q, j]
            assert best[q].item() == brute


def test_majority_vote_ties_and_normalization():
    assert majority_vote(["7", "8", "8", "7"]) == 0           # tie: the answer seen first
    assert majority_vote(["8", " 7", "7.", "8"]) == 0
    assert majority_vote(["A", "b", "B", "a", "B"]) == 1      # case and whitespace normalized
    assert majority_vote(["x"]) == 0


def test_ties_count_as_a_uniform_choice():
    """Equal votes and exactly equal scores: the expected accuracy of a uniform choice."""
    cots = [{"correct": c, "pred": p} for c, p in [(True, "7"), (False, "8"), (False, "8"), (True, "7"), (False, "9")]]
    m = rerank.question_metrics(cots, {"prm": [0.9, 0.9, 0.9, 0.2, 0.9]})
    assert m["majority"] == 0.5                    # "7" (right) and "8" (wrong) tie at two votes each
    assert m["prm"] == 0.25                        # four CoTs tie at 0.9, one of them right
    assert m["pass@1"] == 0.4 and m["oracle"] == 1.0
    assert majority_vote([c["pred"] for c in cots]) == 0     # the pick itself: the first sample
    # Answers with mixed correctness (one key, two CoTs judged differently) count their mean.
    assert prm.uniform_choice([1.0, 0.0, 1.0], [[0, 1], [2]]) == 0.75


def test_evaluate_counts_are_exact():
    q1 = [{"correct": c, "pred": p} for c, p in [(False, "1"), (True, "2"), (False, "1")]]
    q2 = [{"correct": c, "pred": p} for c, p in [(True, "5"), (True, "5")]]
    scores = {"prm": [[0.2, 0.9, 0.1], [0.3, None]]}          # None: a CoT not scored (too long)
    table, curve = rerank.evaluate([("d", q1), ("e", q2)], scores, 5, 0)
    assert table["d"] == {"pass@1": 1 / 3, "majority": 0.0, "prm": 1.0, "oracle": 1.0, "questions": 1}
    assert table["overall"]["pass@1"] == (1 / 3 + 1) / 2 and table["overall"]["prm"] == 1.0
    assert curve["oracle"][2] >= curve["oracle"][1] and set(curve["prm"]) == {1, 2}


def test_rerank_on_published_meta(tmp_path, images, backbone_dir, capsys):
    import prm
    meta_path, _ = write_published(tmp_path, images)
    data = json.load(open(meta_path))
    data.append(dict(data[0], id=3, true_false=False))
    json.dump(data, open(meta_path, "w"))
    model_dir = str(tmp_path / "prm")
    prm.PRM.from_backbone(backbone_dir).save_pretrained(model_dir)
    out = tmp_path / "out"
    assert rerank.main(["--cots", meta_path, "--prm", model_dir, "--names", "p", "--out", str(out)]) == 0
    results = json.load(open(out / "results.json"))
    assert results["skipped"] == 1
    assert results["table"]["overall"]["questions"] == 2
    assert (out / "accuracy_vs_n.png").stat().st_size > 0 and "| overall | 2 |" in (out / "results.md").read_text()
    assert "1 of 3 source records skipped (no steps: 1); 0 of 2 questions have no CoT left" in capsys.readouterr().out


def test_step_report_by_hand():
    records = [{"mc": [1.0, 0.0, 0.0]}, {"mc": [1.0, 0.5]}, {"mc": [0.6, 0.1]}, {"steps": ["x"]}]
    values = [[0.9, 0.2, 0.6], [0.8, 0.2], [0.7, 0.3], [0.3]]
    rep = rerank.step_report(records, values, threshold=0.25)
    se = 0.01 + 0.04 + 0.36 + 0.04 + 0.09 + 0.01 + 0.04
    assert abs(rep["step_mse"] - se / 7) < 1e-12 and rep["cots"] == 3
    # CoT 1: labels and PRM both first below 0.25 at step 1: found. CoT 2: PRM flags step 1, labels
    # none: missed. CoT 3: labels flag step 1, the PRM (0.3) none: missed.
    assert abs(rep["first_error_accuracy"] - 1 / 3) < 1e-12


def test_shared_prefix_scoring_equals_packed_batches(images, tiny_prm):
    """rerank's per-question shared-prefix scoring against packed batches of mixed questions."""
    from test_prm import make_steps
    records = []
    for q in range(3):
        for s in range(4):
            records.append({"id": f"q{q}", "domain": "d", "question": f"Question {q}?", "_question": f"Question {q}?",
                            "_image": images[q] if q < 2 else None, "steps": make_steps(1 + (q + s) % 5, s),
                            "final": str(s)})
    shared, v_shared = score_cots(tiny_prm, records, "mean_logit", shared_prefix=True)
    packed, v_packed = score_cots(tiny_prm, records, "mean_logit", batch_size=5, shared_prefix=False)
    assert max(abs(a - b) for a, b in zip(shared, packed)) <= 1e-4
    assert all(len(a) == len(b) == len(r["steps"]) for a, b, r in zip(v_shared, v_packed, records))
    assert max(abs(x - y) for a, b in zip(v_shared, v_packed) for x, y in zip(a, b)) <= 1e-4
    assert len(set(shared)) > 1


def test_benchmark_step_figures_by_hand():
    """ProcessBench- and VisualProcessBench-style figures from two judged CoTs, against hand counts;
    CoTs in our format (MC fractions) are not judged."""
    from collections import Counter
    records = [{"_format": "processbench", "domain": "gsm8k", "mc": [1.0, 0.0, None]},
               {"_format": "processbench", "domain": "gsm8k", "mc": [1.0, 1.0, 1.0]},
               {"_format": "ours", "domain": "d", "mc": [1.0, 0.0]}]
    values = [[0.9, 0.2, 0.1], [0.9, 0.8, 0.3], [0.1, 0.1]]
    judged = {}
    rerank.add_step_counts(Counter(), judged, records, values)
    b = rerank.benchmark_report(judged, 0.5)
    # steps: right passed 3 (0.9, 0.9, 0.8), right flagged 1 (0.3), wrong flagged 1 (0.2), wrong passed 0
    assert abs(b["f1_right"] - 6 / 7) < 1e-12 and abs(b["f1_wrong"] - 2 / 3) < 1e-12
    assert abs(b["macro_f1"] - (6 / 7 + 2 / 3) / 2) < 1e-12 and b["steps"] == 5
    # the erroneous CoT's first error (step 1) is found; the correct CoT has a step flagged
    g = b["subsets"]["gsm8k"]
    assert g["erroneous_accuracy"] == 1.0 and g["correct_accuracy"] == 0.0 and g["f1"] == 0.0
    assert (b["erroneous"], b["correct"]) == (1, 1) and b["processbench_f1"] == 0.0
    none = {}
    rerank.add_step_counts(Counter(), none, records[2:], values[2:])
    assert rerank.benchmark_report(none, 0.5) is None


def test_rerank_reports_benchmark_figures_on_processbench(tmp_path, backbone_dir, capsys):
    import prm
    steps = ["Step 1: 3 + 4 = 7.", "Step 2: So it is 7.", "Step 3: Done."]
    rows = [{"id": f"q{k % 2}", "generator": "g", "problem": f"Q{k % 2}?", "steps": steps[:2 + k // 2],
             "final_answer_correct": k % 3 == 0, "label": -1 if k % 3 == 0 else 1} for k in range(4)]
    path = tmp_path / "gsm8k.json"
    path.write_text(json.dumps(rows))
    model_dir = str(tmp_path / "prm")
    prm.PRM.from_backbone(backbone_dir).save_pretrained(model_dir)
    out = tmp_path / "out"
    assert rerank.main(["--cots", str(path), "--prm", model_dir, "--names", "p", "--out", str(out)]) == 0
    results = json.load(open(out / "results.json"))
    b = results["benchmark_step_level"]["p"]
    assert (b["erroneous"], b["correct"]) == (2, 2) and b["threshold"] == 0.5 and 0 <= b["macro_f1"] <= 1
    assert "ProcessBench F1, mean of the 1 subset in this file" in (out / "results.md").read_text()
