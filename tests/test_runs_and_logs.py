"""What a user meets around a run: a policy loaded strictly, one model however its path is spelled,
logs a person can read, flags that cannot overflow, divergence and full-file messages that say what
is true, held-out figures that are measured or null, resumes that equal straight runs, and
ProcessBench's own threshold protocol."""
import io
import json
import os
import resource
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import bilevel_train as bt
import gen_cots
import mc_label
import prm
import rerank
from conftest import stop_after
from test_formats import write_json, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, args, capsys):
    code = prm.run_cli(script.main, args)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_question(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "domain": "d", "question": "3 + 4?", "answer": "7"}])


# -- the policy: its weights match its config, a PRM is no policy ----------------------------------

def test_the_policy_loader_refuses_weights_that_do_not_match(tmp_path, backbone_dir, capsys):
    bad = str(tmp_path / "no-head")
    shutil.copytree(backbone_dir, bad)
    weights = load_file(os.path.join(bad, "model.safetensors"))
    del weights["lm_head.weight"]                          # untied embeddings (the config says so), no head
    save_file(weights, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    q = one_question(tmp_path)
    code, _, err = run(gen_cots, ["--questions", q, "--out", str(tmp_path / "c.jsonl"), "--policy", "hf",
                                  "--model", bad], capsys)
    assert code == 2 and err.count("\n") == 1 and "the policy model: weights do not match the model's config: " \
        "missing lm_head.weight" in err, err
    prm_dir = str(tmp_path / "a-prm")
    prm.PRM.from_backbone(backbone_dir).save_pretrained(prm_dir)
    cots = write_jsonl(tmp_path / "cots.jsonl", [{"id": "a", "domain": "d", "question": "3 + 4?", "answer": "7",
                                                  "sample": 0, "steps": ["Step 1: 7."], "correct": True}])
    for script, args in ((gen_cots, ["--questions", q, "--out", str(tmp_path / "c.jsonl")]),
                         (mc_label, ["--cots", cots, "--out", str(tmp_path / "l.jsonl")])):
        code, _, err = run(script, args + ["--policy", "hf", "--model", prm_dir], capsys)
        assert code == 2 and "a-prm: field '--model': a trained PRM (prm.json, prm.safetensors), not a policy" in err, err
    assert not os.path.exists(tmp_path / "c.jsonl") or os.path.getsize(tmp_path / "c.jsonl") == 0


def test_one_model_however_its_path_is_spelled(tmp_path, backbone_dir, capsys, monkeypatch):
    """gen_cots.py with the model's absolute path, then its relative one: the rerun resumes (nothing
    left), it does not stop on 'other parameters'. The same for a bi-level run's --resume."""
    model = str(tmp_path / "models" / "policy")
    shutil.copytree(backbone_dir, model)
    q, out = one_question(tmp_path), str(tmp_path / "c.jsonl")
    args = ["--questions", q, "--out", out, "--policy", "hf", "--n", "1", "--max-tokens", "4"]
    assert run(gen_cots, args + ["--model", model], capsys)[0] == 0
    monkeypatch.chdir(tmp_path / "models")
    code, stdout, err = run(gen_cots, args + ["--model", "policy"], capsys)
    assert code == 0 and f"nothing left to sample: all 1 CoTs of the 1 questions are in {out} already" in stdout, err
    code, _, err = run(gen_cots, args + ["--model", "../models/policy", "--temperature", "0.5"], capsys)
    assert code == 2 and "temperature 0.7 -> 0.5" in err and "model" not in err.split("parameters:")[1], err
    train = ["--synthetic", "--iterations", "1", "--unroll-steps", "1", "--train-batch", "2", "--meta-batch", "2"]
    assert run(bt, train + ["--model", model, "--out", str(tmp_path / "run")], capsys)[0] == 0
    code, stdout, err = run(bt, train[:2] + ["2"] + train[3:] + ["--model", "./policy", "--out", "../run", "--resume"],
                            capsys)
    assert code == 0 and "resumed ../run at iteration 1" in stdout, err


# -- progress: a bar on a terminal, a few lines in a log -------------------------------------------

def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = prm.progress(range(3), desc="x")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    monkeypatch.undo()
    bar = prm.progress(range(5), desc="work", unit="cot")
    assert isinstance(bar, prm.ProgressLines) and list(bar) == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("work: 5/5 cot (100%), 0 s, ") and "cot/s" in lines[0]
    monkeypatch.setattr(prm, "PROGRESS_EVERY", 0.0)              # a line at every update when due
    with prm.progress(total=4, initial=1, desc="gen", unit="q") as bar:
        bar.set_postfix_str("a=1.00")
        bar.update(1)
        bar.update(2)
    lines = capsys.readouterr().err.splitlines()
    assert [x.split(",")[0] for x in lines] == ["gen: 2/4 q (50%)", "gen: 4/4 q (100%)", "gen: 4/4 q (100%)"]
    assert "about" in lines[0] and lines[0].endswith(", a=1.00")


def test_a_run_off_a_terminal_writes_a_few_plain_progress_lines(small_toy, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mc_label.py"), "--cots",
                           str(small_toy / "train_cots.jsonl"), "--out", str(tmp_path / "l.jsonl"), "--rollouts", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and proc.stderr.count("\n") <= 3, proc.stderr
    assert [x for x in proc.stderr.splitlines() if x.startswith("mc_label: 64/64 cot (100%)")]
    assert "rollouts/s)" in proc.stdout and " (0 rollouts/s)" not in proc.stdout


# -- flags that can only overflow, divergence, the file-size limit ---------------------------------

@pytest.mark.parametrize("flags,words", [
    (["--weight-decay", "1e300"], "argument --weight-decay: 1e300 must be <="),
    (["--weight-decay", "20000", "--lr", "1e-4"], "field '--weight-decay': 20000 with --lr 0.0001: each step would "
                                                   "scale phi by 1 - lr x weight decay = -1"),
])
def test_optimizer_values_that_can_only_overflow_are_refused_when_read(flags, words, capsys):
    try:
        code = bt.cli(["--synthetic"] + flags)
    except SystemExit as e:                                       # argparse's own check
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1, err


def test_the_file_size_limit_names_the_file_and_the_rerun_resumes(small_toy, tmp_path):
    out = tmp_path / "l.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "mc_label.py"), "--cots", str(small_toy / "train_cots.jsonl"),
           "--out", str(out), "--rollouts", "4"]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (12000, 12000))  # noqa: E731
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error")]
    assert proc.returncode == 1 and errors == [f"error: the file-size limit reached (ulimit -f) writing {out}: raise "
                                               "the limit and rerun the same command to resume"], proc.stderr
    kept = out.read_text()
    kept = kept[:kept.rfind("\n") + 1]                 # a torn last line is dropped by the rerun
    assert 0 < kept.count("\n") < 64
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    keys = [(r["id"], r["sample"]) for r in map(json.loads, out.read_text().splitlines())]
    assert proc.returncode == 0 and len(keys) == len(set(keys)) == 64 and out.read_text().startswith(kept)


# -- figures: the rate, nothing left, held-out figures not measured ---------------------------------

def test_rates_show_their_digits_and_reruns_say_nothing_was_left(small_toy, tmp_path, capsys):
    assert [prm.rate_text(x) for x in (426.8, 12.04, 3.456, 0.1512, 0.0)] == ["427", "12", "3.5", "0.15", "0"]
    q = write_jsonl(tmp_path / "q.jsonl", [json.loads(x) for x in open(small_toy / "test_questions.jsonl")][:1])
    shutil.copytree(small_toy / "images", tmp_path / "images")
    cots, labels = str(tmp_path / "c.jsonl"), str(tmp_path / "l.jsonl")
    assert run(gen_cots, ["--questions", q, "--out", cots, "--n", "2"], capsys)[1].startswith("CoTs written")
    assert "nothing left to sample" in run(gen_cots, ["--questions", q, "--out", cots, "--n", "2"], capsys)[1]
    assert "labels written" in run(mc_label, ["--cots", cots, "--out", labels, "--rollouts", "2"], capsys)[1]
    stdout = run(mc_label, ["--cots", cots, "--out", labels, "--rollouts", "2"], capsys)[1]
    assert f"nothing left to label: all 2 CoTs are in {labels} already" in stdout


def test_held_out_figures_that_were_not_measured_are_null(tmp_path, capsys):
    train, meta = bt.synthetic_data(0, 4, 4)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in train[:4]]
    held = write_jsonl(tmp_path / "held.jsonl", [dict(r, mc=[None] * len(r["steps"])) for r in rows])
    code, stdout, err = run(bt, ["--synthetic", "--iterations", "1", "--unroll-steps", "1", "--train-batch", "2",
                                 "--meta-batch", "2", "--eval", held, "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert stdout.count("no step is labelled: step AUC and step accuracy are not measured (null in eval.jsonl)") == 1
    (row,) = [json.loads(x) for x in open(tmp_path / "run" / "eval.jsonl")]
    assert row["eval/step_accuracy"] is None and row["eval/step_auc"] is None


# -- resume = a straight run, for every schedule --------------------------------------------------

def checkpoint(out):
    return load_file(os.path.join(out, "checkpoint", "model.safetensors"))


@pytest.mark.parametrize("schedule", [[], ["--lr-schedule", "step", "--lr-step", "2", "--lr-gamma", "0.5"],
                                      ["--lr-schedule", "cosine"], ["--warmup", "0.5"]],
                         ids=["constant", "step", "cosine", "warmup"])
def test_resume_equals_a_straight_run_for_every_schedule(tmp_path, capsys, monkeypatch, schedule):
    base = ["--synthetic", "--unroll-steps", "2", "--train-batch", "2", "--meta-batch", "2", "--save-every", "2",
            "--lr", "1e-3"] + schedule
    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    assert run(bt, base + ["--iterations", "4", "--out", straight], capsys)[0] == 0
    stop_after(monkeypatch, 3, base + ["--iterations", "4", "--out", cut])
    assert run(bt, base + ["--iterations", "4", "--out", cut, "--resume"], capsys)[0] == 0
    a, b = checkpoint(straight), checkpoint(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A longer run: the same as a straight one where the schedule does not depend on the length;
    # refused in one line where it does.
    longer = str(tmp_path / "longer")
    assert run(bt, base + ["--iterations", "2", "--out", longer], capsys)[0] == 0
    code, _, err = run(bt, base + ["--iterations", "4", "--out", longer, "--resume"], capsys)
    if "cosine" in schedule or "--warmup" in schedule:
        assert code == 2 and "field '--iterations': 4 where the run has 2" in err and err.count("\n") == 1, err
    else:
        assert code == 0, err
        c = checkpoint(longer)
        assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_changed_eval_file_is_refused_on_resume(tmp_path, capsys):
    train, _ = bt.synthetic_data(0, 4, 4)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in train[:4]]
    held = write_jsonl(tmp_path / "held.jsonl", rows)
    args = ["--synthetic", "--iterations", "1", "--unroll-steps", "1", "--train-batch", "2", "--meta-batch", "2",
            "--eval", held, "--out", str(tmp_path / "run")]
    assert run(bt, args, capsys)[0] == 0
    write_jsonl(tmp_path / "held.jsonl", [dict(r, mc=[0.5] * len(r["steps"])) for r in rows])
    code, _, err = run(bt, args[:2] + ["2"] + args[3:] + ["--resume"], capsys)
    assert code == 2 and "eval_digest" in err and err.count("\n") == 1, err


# -- ProcessBench: the threshold with the best F1 on GSM8K ----------------------------------------

def judged(rows):
    out = {}
    for subset, mc, v in rows:
        rerank.add_step_counts(Counter(), out, [{"_format": "processbench", "domain": subset, "mc": mc}], [v])
    return out


def test_best_threshold_is_the_best_f1_over_the_observed_values():
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in range(40):
        n = 2 + k % 4
        wrong = int(torch.randint(-1, n, (1,), generator=g))
        mc = [1.0] * n if wrong < 0 else [1.0] * wrong + [0.0] + [None] * (n - wrong - 1)
        v = torch.rand(n, generator=g).tolist() if k % 9 else None           # some CoTs unscored
        rows.append(("gsm8k" if k % 3 else "math", mc, v))
    j = judged(rows)
    t, f1 = rerank.best_threshold(j["gsm8k"])
    brute = {x: rerank.benchmark_report({"gsm8k": j["gsm8k"]}, x)["subsets"]["gsm8k"]["f1"] or -1
             for _, mc, v in rows if v is not None for x, p in zip(v, mc) if p is not None}
    best = max(brute.values())
    assert abs(f1 - best) < 1e-12 and t == min(x for x, f in brute.items() if f == best)
    report = rerank.benchmark_report(j, *rerank.resolve_threshold("best:gsm8k", j, "p"))
    assert report["threshold"] == t and abs(report["subsets"]["gsm8k"]["f1"] - f1) < 1e-12
    assert report["threshold_rule"] == "the best F1 on gsm8k (ProcessBench's protocol)"
    four = judged([(s, [1.0, 0.0], [0.9, 0.1]) for s in rerank.PROCESSBENCH_SUBSETS] +
                  [(s, [1.0, 1.0], [0.9, 0.9]) for s in rerank.PROCESSBENCH_SUBSETS])
    md = rerank.benchmark_markdown({"p": rerank.benchmark_report(four, 0.5)})
    assert "ProcessBench F1, average of its four subsets" in md and "| p | 0.5 (fixed) |" in md


def test_rerank_takes_the_threshold_protocol(tmp_path, backbone_dir, capsys):
    steps = ["Step 1: 3 + 4 = 7.", "Step 2: So it is 7.", "Step 3: Done."]
    rows = [{"id": f"{s}-{k}", "generator": "g", "problem": f"{s} {k}?", "steps": steps,
             "final_answer_correct": k % 2 == 0, "label": -1 if k % 2 == 0 else k % 3} for s in ("gsm8k", "math")
            for k in range(6)]
    path = write_json(tmp_path / "pb.json", rows)
    model_dir = str(tmp_path / "prm")
    prm.PRM.from_backbone(backbone_dir).save_pretrained(model_dir)
    out = str(tmp_path / "out")
    args = ["--cots", path, "--prm", model_dir, "--names", "p", "--out", out]
    code, stdout, err = run(rerank, args + ["--step-threshold", "best:gsm8k"], capsys)
    assert code == 0, err
    b = json.load(open(os.path.join(out, "results.json")))["benchmark_step_level"]["p"]
    assert b["threshold_rule"] == "the best F1 on gsm8k (ProcessBench's protocol)"
    assert f"p: step threshold {b['threshold']:.6g}, the best F1" in stdout and "used for every subset" in stdout
    assert "mean of the 2 subsets in this file" in open(os.path.join(out, "results.md")).read()
    code, _, err = run(rerank, args + ["--step-threshold", "best:omnimath"], capsys)
    assert code == 2 and "no CoT of subset 'omnimath' in the file (subsets: gsm8k, math)" in err, err
    with pytest.raises(SystemExit) as info:
        rerank.main(args + ["--step-threshold", "best"])
    assert info.value.code == 2 and "argument --step-threshold: 'best' is not a number; give a number in [0, 1], or " \
        "best:SUBSET" in capsys.readouterr().err


def test_a_run_whose_values_saturate_says_so(backbone_dir, capsys, monkeypatch):
    """A PRM whose step values sit at 0 or 1 while its labels do not: one line naming --lr. The
    check scores its CoTs a training batch at a time (one forward of all 64 at the end of a 2B run
    would need more memory than training did)."""
    train, _ = bt.synthetic_data(0, 4, 4)
    model = prm.PRM.from_backbone(backbone_dir).eval()
    forward = bt.PackedForward(model, torch.autocast("cpu", enabled=False))
    sizes, real = [], bt.PackedForward.__call__
    monkeypatch.setattr(bt.PackedForward, "__call__", lambda self, records: sizes.append(len(records)) or
                        real(self, records))
    assert bt.saturation_note(forward, train[:7], 1e-4, 3) is None
    assert sizes == [3, 3, 1]
    with torch.no_grad():
        model.head.bias.fill_(-40.0)                                 # every value ~0, labels mixed
    note = bt.saturation_note(forward, train[:7], 1e-4, 3)
    assert note.startswith("warning: the PRM's step values saturate: 100% of them lie within 0.001 of 0 or 1") \
        and "on 7 training CoTs" in note and "rerun with a smaller --lr (now 0.0001) and --overwrite" in note


def test_token_batches_bound_a_forward_and_keep_the_values(tiny_prm):
    steps = ["Step 1: Read 3 and 4.", "Step 2: Add them: 3 + 4 = 7.", "Step 3: The sum is 7."]
    cots = [tiny_prm.encode(dict(question="Q" + "?" * k, steps=steps[:1 + k % 3], final="7", image=None))
            for k in range(7)]
    groups = prm.token_batches(cots, 60)
    assert [i for g in groups for i in g] == list(range(7)) and len(groups) > 1
    assert all(len(g) == 1 or max(len(cots[i].input_ids) for i in g) * len(g) <= 60 for g in groups)
    assert prm.token_batches(cots, None) == [list(range(7))]
    with torch.no_grad():
        v, m = prm.step_values(tiny_prm, cots)
        for g in groups:
            vg, mg = prm.step_values(tiny_prm, [cots[i] for i in g])
            for j, i in enumerate(g):
                assert (vg[j][mg[j]] - v[i][m[i]]).abs().max() <= 1e-6
