"""gen_cots.py and mc_label.py against a serving engine: the concurrency bound, kill and resume
under concurrency, one writer per output, parameters that must match, order-free readers."""
import os
import random
import subprocess
import sys

import pytest

import bilevel_train as bt
import gen_cots
import mc_label
import prm
from conftest import kill_after_lines
from engine_server import StandIn, write_questions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def server():
    with StandIn(latency=0.05) as s:
        yield s


def openai(server, concurrency):
    return ["--policy", "openai", "--base-url", server.url, "--concurrency", str(concurrency)]


def test_concurrency_bound_is_respected_and_reached(tmp_path, server):
    questions = write_questions(tmp_path / "q.jsonl", 40)
    cots = str(tmp_path / "cots.jsonl")
    server.reset(hold=8)
    assert gen_cots.main(["--questions", questions, "--out", cots, "--n", "2"] + openai(server, 8)) == 0
    assert server.requests == 40 and server.peak == 8
    assert len(open(cots).read().splitlines()) == 80
    server.reset(hold=16)
    assert mc_label.main(["--cots", cots, "--out", str(tmp_path / "l.jsonl"), "--rollouts", "2"] + openai(server, 16)) == 0
    assert server.requests == 80 * 4 and server.peak == 16          # 4 prefixes of 5 steps per CoT
    server.reset(hold=3)                                         # a bound below one CoT's requests
    assert mc_label.main(["--cots", cots, "--out", str(tmp_path / "l2.jsonl"), "--rollouts", "2"] + openai(server, 3)) == 0
    assert server.requests == 320 and server.peak == 3


def test_hf_style_batches_span_questions():
    """A batched policy gets prompts of several tasks in one call, up to its batch size."""
    calls = []

    class Batched:
        parallel, batch_size = False, 5

        def sample(self, prompts, n):
            calls.append(len(prompts))
            return [[f"{p}:{k}" for k in range(n)] for p in prompts]

    def task(i):
        texts, = yield [(f"q{i}", 2)]
        return texts
    out = []
    peak = gen_cots.drive(Batched(), (task(i) for i in range(12)), out.append, concurrency=64)
    assert calls == [5, 5, 2] and peak == 5 and sorted(out) == sorted([f"q{i}:0", f"q{i}:1"] for i in range(12))


def test_kill_and_resume_under_concurrency(tmp_path):
    """SIGKILL while 16 requests are in flight; the rerun gives the same records as a run that was
    never killed, each once."""
    with StandIn(latency=0.02) as s:
        questions = write_questions(tmp_path / "q.jsonl", 30)
        cots = str(tmp_path / "cots.jsonl")
        assert gen_cots.main(["--questions", questions, "--out", cots, "--n", "2"] + openai(s, 16)) == 0
        args = [sys.executable, os.path.join(ROOT, "mc_label.py"), "--cots", cots, "--rollouts", "2"] + openai(s, 16)
        full = str(tmp_path / "full.jsonl")
        subprocess.run(args + ["--out", full], check=True, capture_output=True)
        cut = str(tmp_path / "cut.jsonl")
        n_cut = kill_after_lines(args, cut, 10, timeout=60)
        subprocess.run(args + ["--out", cut], check=True, capture_output=True)
    lines = open(cut).read().splitlines()
    assert 10 <= n_cut < len(lines) == 60
    assert sorted(lines) == sorted(open(full).read().splitlines())


def test_one_writer_per_output(tmp_path, capsys):
    out = str(tmp_path / "toy" / "train_cots.jsonl")
    os.makedirs(os.path.dirname(out))
    with prm.output_lock(out):                                   # another writer holds it
        code = prm.run_cli(gen_cots.main, ["--toy", "--toy-dir", str(tmp_path / "toy")])
    err = capsys.readouterr().err
    assert code == 2 and "train_cots.jsonl: another process is writing this output" in err
    with prm.output_lock(out):                                   # released when its holder is done
        pass


def test_parameters_that_shape_records_must_match(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gen_cots, "TOY_SETS", dict(train={d: 2 for d in gen_cots.TOY_DOMAINS}, meta=2, test=2))
    toy = str(tmp_path / "toy")
    assert gen_cots.main(["--toy", "--toy-dir", toy, "--n", "2"]) == 0
    assert gen_cots.main(["--toy", "--toy-dir", toy, "--n", "3"]) == 0    # more samples: allowed
    assert len(open(os.path.join(toy, "test_cots.jsonl")).read().splitlines()) == 6
    code = prm.run_cli(gen_cots.main, ["--toy", "--toy-dir", toy, "--n", "3", "--seed", "1"])
    assert code == 2 and "written with other parameters: seed 0 -> 1" in capsys.readouterr().err
    cots = os.path.join(toy, "train_cots.jsonl")
    assert mc_label.main(["--cots", cots, "--rollouts", "4"]) == 0
    code = prm.run_cli(mc_label.main, ["--cots", cots, "--rollouts", "8", "--zero-stop"])
    err = capsys.readouterr().err
    assert code == 2 and "rollouts 4 -> 8" in err and "zero_stop False -> True" in err


def test_readers_do_not_depend_on_record_order(tmp_path, small_toy):
    """Records written in completion order: training sees the same sorted set either way."""
    assert mc_label.main(["--cots", str(small_toy / "train_cots.jsonl"), "--rollouts", "4"]) == 0
    labels = small_toy / "train_labels.jsonl"
    lines = labels.read_text().splitlines()
    random.Random(0).shuffle(lines)
    shuffled = small_toy / "shuffled.jsonl"                      # beside the images it names
    shuffled.write_text("\n".join(lines) + "\n")
    meta = str(small_toy / "meta_cots.jsonl")

    def keys(path):
        args = bt.parse_args(["--train", str(path), "--meta", meta])
        train, meta_records, _ = bt.read_inputs(args)
        return [prm.record_key(r) for r in train], [prm.record_key(r) for r in meta_records]
    assert keys(labels) == keys(shuffled)
