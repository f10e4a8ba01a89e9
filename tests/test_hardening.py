"""Every user mistake is one clear line and exit code 2, before any model loads or file is written."""
import json
import os

import pytest

import bilevel_train as bt
import gen_cots
import mc_label
import prm
import rerank
from test_formats import labels_row, write_jsonl


@pytest.mark.parametrize("script,flags,words", [
    (bt, ["--iterations", "0"], "argument --iterations: 0 must be >= 1"),
    (bt, ["--iterations", "-3"], "argument --iterations: -3 must be >= 1"),
    (bt, ["--lr", "0"], "argument --lr: 0 must be > 0"),
    (bt, ["--lr", "-1"], "argument --lr: -1 must be > 0"),
    (bt, ["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (bt, ["--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
    (bt, ["--meta-lr", "0"], "argument --meta-lr: 0 must be > 0"),
    (bt, ["--save-every", "0"], "argument --save-every: 0 must be >= 1"),
    (bt, ["--log-every", "0"], "argument --log-every: 0 must be >= 1"),
    (bt, ["--unroll-steps", "0"], "argument --unroll-steps: 0 must be >= 1"),
    (bt, ["--train-batch", "0"], "argument --train-batch: 0 must be >= 1"),
    (bt, ["--meta-batch", "-2"], "argument --meta-batch: -2 must be >= 1"),
    (bt, ["--fd-radius", "0"], "argument --fd-radius: 0 must be > 0"),
    (bt, ["--weight-decay", "-0.1"], "argument --weight-decay: -0.1 must be >= 0"),
    (bt, ["--iterations", "2.5"], "argument --iterations: '2.5' is not an integer"),
    (rerank, ["--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (rerank, ["--subsets", "0"], "argument --subsets: 0 must be >= 1"),
    (gen_cots, ["--n", "0"], "argument --n: 0 must be >= 1"),
    (gen_cots, ["--concurrency", "0"], "argument --concurrency: 0 must be >= 1"),
    (gen_cots, ["--retries", "-1"], "argument --retries: -1 must be >= 0"),
    (gen_cots, ["--temperature", "-0.5"], "argument --temperature: -0.5 must be >= 0"),
    (gen_cots, ["--max-tokens", "0"], "argument --max-tokens: 0 must be >= 1"),
    (mc_label, ["--rollouts", "0"], "argument --rollouts: 0 must be >= 1"),
    (mc_label, ["--max-steps", "0"], "argument --max-steps: 0 must be >= 1"),
    (mc_label, ["--min-rollouts", "-1"], "argument --min-rollouts: -1 must be >= 0"),
    (mc_label, ["--min-rollouts", "16"], "argument --min-rollouts: 16 must be below --rollouts 16"),
    (bt, ["--lr", "1e30"], "argument --lr: 1e30 must be <= 10.0"),
    (bt, ["--seed", "99999999999999999999"], "must be <= 2147483647"),
    (bt, ["--train-batch", "99999999999"], "must be <= 1048576"),
    (bt, ["--net-hidden", "10000000"], "must be <= 65536"),
    (bt, ["--min-pixels", "99999999999"], "must be <= 1000000000"),
    (gen_cots, ["--n", "10000000"], "must be <= 100000"),
    (gen_cots, ["--top-p", "0"], "argument --top-p: 0 must be > 0"),
    (gen_cots, ["--timeout", "0"], "argument --timeout: 0 must be > 0"),
])
def test_numeric_flags_are_checked_at_parse_time(script, flags, words, capsys):
    with pytest.raises(SystemExit) as info:
        script.main(flags)
    err = capsys.readouterr().err
    assert info.value.code == 2 and words in err and err.count("\n") == 1, err


def run(script, args, capsys):
    code = prm.run_cli(script.main, args)
    return code, capsys.readouterr().err


@pytest.fixture
def data(tmp_path, images):
    train = write_jsonl(tmp_path / "train.jsonl", [labels_row("t1", "Q one?", images[0], domain="ai2d"),
                                                   labels_row("t2", "Q two?", None, False, domain=" m3cot "),
                                                   labels_row("t3", "Q six?", None, False, domain="chartqa")])
    meta = write_jsonl(tmp_path / "meta.jsonl", [labels_row("m1", "Q three?", images[1], True),
                                                 labels_row("m2", "Q four?", None, False)])
    return train, meta


def short(args):
    return args + ["--model", "tiny", "--iterations", "2", "--unroll-steps", "1", "--train-batch", "2",
                   "--meta-batch", "2", "--save-every", "1"]


@pytest.mark.parametrize("case,words", [
    ("missing_train", "no such file"),
    ("missing_meta", "no such file"),
    ("bad_utf8", "train.jsonl:4: invalid UTF-8"),
    ("empty_train", "no usable training CoTs"),
    ("domains_empty", "field '--domains': an empty list"),
    ("domains_comma", "field '--domains': an empty list"),
    ("domains_twice", "field '--domains': named twice: ai2d"),
    ("domains_blank_name", "field '--domains': an empty name"),
    ("out_is_a_file", "cannot write here"),
])
def test_bad_inputs_stop_before_the_model_loads(tmp_path, data, capsys, case, words):
    train, meta = data
    out = tmp_path / "run"
    args = ["--train", train, "--meta", meta, "--out", str(out)]
    if case == "missing_train":
        args[1] = str(tmp_path / "nope.jsonl")
    elif case == "missing_meta":
        args[3] = str(tmp_path / "nope.jsonl")
    elif case == "bad_utf8":
        with open(train, "ab") as f:
            f.write(b'{"id": "\xff\xfe"}\n')
    elif case == "empty_train":
        open(train, "w").close()
    elif case == "domains_empty":
        args += ["--domains", ""]
    elif case == "domains_comma":
        args += ["--domains", ","]
    elif case == "domains_twice":
        args += ["--domains", "ai2d, ai2d"]
    elif case == "domains_blank_name":
        args += ["--domains", "ai2d,,m3cot"]
    else:
        (tmp_path / "file").write_text("x")
        args[5] = str(tmp_path / "file" / "run")
    code, err = run(bt, short(args), capsys)
    assert code == 2 and words in err and err.count("\n") == 1, err
    assert not out.exists()


def test_domains_are_stripped_and_the_left_out_named(tmp_path, data, capsys):
    train, meta = data
    code = bt.main(short(["--train", train, "--meta", meta, "--out", str(tmp_path / "run"), "--domains", " m3cot ,ai2d"]))
    out = capsys.readouterr().out
    assert code == 0 and "domains left out (not in --domains): chartqa" in out
    assert json.load(open(tmp_path / "run" / "config.json"))["domains"] == ["m3cot", "ai2d"]


def test_resume_and_overwrite_rules(tmp_path, data, capsys):
    train, meta = data
    out = str(tmp_path / "run")
    base = ["--train", train, "--meta", meta, "--out", out]
    assert bt.main(short(base)) == 0
    capsys.readouterr()
    # Another setting on --resume: refused, naming what differs.
    code, err = run(bt, short(base + ["--resume", "--seed", "3", "--domains", "ai2d,m3cot"]), capsys)
    assert code == 2 and "--resume with other settings than the stored run: " in err
    assert "domains ['ai2d', 'chartqa', 'm3cot'] -> ['ai2d', 'm3cot']" in err and "seed 0 -> 3" in err
    code, err = run(bt, short(base + ["--resume", "--lr", "0.5"]), capsys)
    assert code == 2 and "lr 0.0001 -> 0.5" in err
    # --iterations below the checkpoint: refused; upward and --log-every may change.
    code, err = run(bt, short(base + ["--resume"]) + ["--iterations", "1"], capsys)
    assert code == 2 and "the checkpoint is at iteration 2; --iterations 1 is below it" in err
    assert bt.main(short(base + ["--resume", "--log-every", "3"]) + ["--iterations", "3"]) == 0
    assert "resumed" in capsys.readouterr().out
    # A fresh run into it: refused while a checkpoint is there; after the checkpoint is gone, the
    # other outputs are still protected unless --overwrite.
    code, err = run(bt, short(base), capsys)
    assert code == 2 and "holds a checkpoint: pass --resume" in err
    import shutil
    shutil.rmtree(os.path.join(out, "checkpoint"))
    metrics = open(os.path.join(out, "metrics.jsonl")).read()
    code, err = run(bt, short(base), capsys)
    assert code == 2 and "another run's outputs (metrics.jsonl, config.json" in err and "--overwrite" in err
    assert open(os.path.join(out, "metrics.jsonl")).read() == metrics
    assert bt.main(short(base + ["--overwrite"])) == 0


def test_baseline_takes_every_flag_but_its_own():
    argv = ["--seed", "3", "--weighting=domain", "--out", "runs/x", "--lr", "5e-7", "--resume", "--iterations", "2",
            "--precision", "bf16", "--overwrite", "--weighting", "domain"]
    assert bt.baseline_argv(argv, "runs/x-vanilla", False) == [
        "--seed", "3", "--lr", "5e-7", "--iterations", "2", "--precision", "bf16",
        "--weighting", "fixed", "--out", "runs/x-vanilla"]
    assert bt.baseline_argv([], "b", True)[-1] == "--resume"


def test_no_baseline_when_data_is_given(tmp_path, data, capsys):
    train, meta = data
    out = str(tmp_path / "run")
    assert bt.main(short(["--train", train, "--meta", meta, "--out", out])) == 0
    assert "vanilla" not in capsys.readouterr().out and not os.path.exists(out + "-vanilla")


def test_rerank_checks_its_output_before_scoring(tmp_path, backbone_dir, capsys):
    (tmp_path / "file").write_text("x")
    path = write_jsonl(tmp_path / "test.jsonl", [labels_row("q", "Q?")])
    code, err = run(rerank, ["--cots", path, "--prm", backbone_dir, "--out", str(tmp_path / "file" / "out")], capsys)
    assert code == 2 and "cannot write here" in err and err.count("\n") == 1


def test_project_cites_no_outside_documents():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in sorted(os.listdir(root)) + [os.path.join("tests", n) for n in sorted(os.listdir(os.path.join(root, "tests")))]:
        if name.endswith((".py", ".md")) and name != os.path.join("tests", "test_hardening.py"):
            text = open(os.path.join(root, name)).read()
            assert "DESIGN" + ".md" not in text and "STYLE" + ".md" not in text, name
