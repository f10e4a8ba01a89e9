"""Faults a user meets on real data and real machines: skipped records in every reading script,
two runs on one --out, servers that cut a reply or stall, a full disk while saving, an unfinished
run given to rerank.py. Each ends in a right result or one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

import bilevel_train as bt
import gen_cots
import mc_label
import prm
import rerank
from conftest import policy_from_flags
from test_formats import QUESTION, STEPS, labels_row, prm800k_row, vpb_row, write_json, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, args, capsys):
    code = prm.run_cli(script.main, args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def saved_prm(tmp_path_factory, backbone_dir):
    path = str(tmp_path_factory.mktemp("prm") / "prm")
    prm.PRM.from_backbone(backbone_dir).save_pretrained(path)
    return path


# -- 1. a skipped record never crashes a run --------------------------------------------------------

def skipping_test_files(tmp_path, images):
    """{format: (file, kept questions, skip reasons)}: test CoTs (several per question) in each format
    whose reader skips records, each file with kept records and skipped ones."""
    one = lambda text: dict(prm800k_row(STEPS[:1], [1], "solution"),  # noqa: E731
                            question={"problem": text, "ground_truth_answer": "7"})
    pk = [dict(prm800k_row(STEPS, [1, 1, 1])), dict(prm800k_row(STEPS[:2], [1, -1], "found_error")),
          prm800k_row(STEPS[:1], [1], "give_up"), one("Another question?"),
          dict(prm800k_row(STEPS[:1], [1], "bad_problem"), question={"problem": "Lost?", "ground_truth_answer": "1"})]
    vpb = [vpb_row([images[0]], [1, 1, 1]), vpb_row([images[0]], [1, -1]), vpb_row(images[:2], [1, 1])]
    trl = [{"prompt": QUESTION, "completions": STEPS, "labels": [True] * 3, "answer": "7", "correct": True},
           {"prompt": QUESTION, "completions": STEPS[:2], "labels": [True, False]},
           {"prompt": QUESTION, "completions": [], "labels": []},
           {"prompt": QUESTION, "completions": STEPS, "labels": [True] * 3, "images": images[:2]}]
    meta = [{"id": 1, "true_false": True, "input": f"Question: {QUESTION}\n\n" + "\n".join(STEPS) + "\nFinal answer: 7",
             "image_path": None},
            {"id": 1, "true_false": False, "input": f"Question: {QUESTION}\n\nStep 1: 3 + 4 = 8.\nFinal answer: 8",
             "image_path": None},
            {"id": 2, "true_false": True, "input": "Question: Q2\n\nFinal answer: B", "image_path": None}]
    return {"prm800k": (write_jsonl(tmp_path / "prm800k.jsonl", pk), 2,
                        ["finish_reason bad_problem: no outcome", "finish_reason give_up: no outcome"]),
            "visualprocessbench": (write_jsonl(tmp_path / "vpb.jsonl", vpb), 1, ["several images"]),
            "trl": (write_jsonl(tmp_path / "trl.jsonl", trl), 1, ["no steps", "several images"]),
            "dreamprm": (write_json(tmp_path / "meta.json", meta), 1, ["no steps"])}


@pytest.mark.parametrize("fmt", ["prm800k", "visualprocessbench", "trl", "dreamprm"])
def test_rerank_goes_on_past_skipped_records(tmp_path, images, saved_prm, capsys, fmt):
    """The skip summary once, counted in source records; scores and tables over the kept CoTs only."""
    path, kept_questions, reasons = skipping_test_files(tmp_path, images)[fmt]
    records, skips = prm.read_cots(path, "test", correct_from="last-label")
    assert sorted(s.reason for s in skips) == reasons
    out = tmp_path / "out"
    code, stdout, err = run(rerank, ["--cots", path, "--prm", saved_prm, "--names", "p", "--out", str(out),
                                     "--correct-from", "last-label"], capsys)
    assert code == 0, err
    n_items = len(json.load(open(path))) if path.endswith(".json") else len(open(path).read().splitlines())
    summary = [line for line in stdout.splitlines() if "source records skipped" in line]
    assert len(summary) == 1 and f"{len(reasons)} of {n_items} source records skipped" in summary[0], stdout
    assert len(open(out / "scores.jsonl").read().splitlines()) == len(records)
    assert len(open(out / "picks.jsonl").read().splitlines()) == kept_questions
    results = json.load(open(out / "results.json"))
    assert results["skipped"] == len(reasons) and results["table"]["overall"]["questions"] == kept_questions


def test_mc_label_and_gen_cots_go_on_past_skipped_records(small_toy, tmp_path, capsys):
    """The toy policy's own files with one record without steps added: skipped, said once, the rest done."""
    rows = [json.loads(x) for x in open(small_toy / "test_cots.jsonl")]
    path = write_jsonl(small_toy / "skip_cots.jsonl", rows + [dict(rows[0], id="stepless", steps=[])])
    out = str(tmp_path / "labels.jsonl")
    code, stdout, err = run(mc_label, ["--cots", path, "--out", out, "--rollouts", "2"], capsys)
    assert code == 0, err
    assert stdout.count("source records skipped") == 1, stdout
    assert f"1 of {len(rows) + 1} source records skipped (no steps: 1); 1 of" in stdout
    assert len(open(out).read().splitlines()) == len(rows)
    qs = [json.loads(x) for x in open(small_toy / "test_questions.jsonl")]
    questions = write_jsonl(small_toy / "skip_questions.jsonl", qs + [dict(qs[0], id="stepless", steps=[])])
    cots = str(tmp_path / "new_cots.jsonl")
    code, stdout, err = run(gen_cots, ["--questions", questions, "--out", cots, "--n", "2"], capsys)
    assert code == 0, err
    assert stdout.count("source records skipped") == 1 and \
        f"1 of {len(qs) + 1} source records skipped (no steps: 1)" in stdout, stdout
    assert {json.loads(x)["id"] for x in open(cots)} == {q["id"] for q in qs}


def test_bilevel_train_goes_on_past_skipped_train_and_meta_records(tmp_path, images, capsys):
    files = skipping_test_files(tmp_path, images)
    train = write_jsonl(tmp_path / "train.jsonl", [labels_row("t1", "Q one?", images[0]),
                                                   labels_row("t2", "Q two?", None, False),
                                                   dict(labels_row("t3", "Q three?"), steps=[], mc=[])])
    trl_train = files["trl"][0]
    code = bt.cli(["--train", train, trl_train, "--meta", files["dreamprm"][0], "--model", "tiny", "--iterations", "1",
                   "--unroll-steps", "1", "--train-batch", "2", "--meta-batch", "2", "--out", str(tmp_path / "run"),
                   "--allow-overlap"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert f"{train}: 2 training CoTs (ours format); 1 of 3 source records skipped (no steps: 1)" in stdout
    assert f"{trl_train}: 2 training CoTs (trl format); 2 of 4 source records skipped" in stdout
    assert f"{files['dreamprm'][0]}: 2 meta CoTs; 1 of 3 source records skipped (no steps: 1)" in stdout
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert (config["n_train"], config["n_meta"]) == (4, 2)


# -- 2. two runs on one --out -------------------------------------------------------------------------

SOLO = ["--synthetic", "--iterations", "4", "--save-every", "1", "--log-every", "1", "--no-baseline",
        "--unroll-steps", "1"]


def start(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "bilevel_train.py"), *SOLO, "--out", out, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=os.path.dirname(out))


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def outputs(run_dir):
    return {name: open(os.path.join(run_dir, name), "rb").read() for name in ("metrics.jsonl", "domain_weights.json")} \
        | {"head": load_file(os.path.join(run_dir, "prm", "prm.safetensors"))["head.weight"]}


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """solo(seed): the outputs of the run alone (made once per seed)."""
    made = {}

    def outputs_of(seed):
        if seed not in made:
            out = str(tmp_path_factory.mktemp("solo") / "solo")
            assert start(out, "--seed", str(seed)).wait(timeout=300) == 0
            made[seed] = outputs(out)
        return made[seed]
    return outputs_of


def same_run(mine, alone):
    strip = lambda b: [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in b.splitlines()]  # noqa
    assert [json.loads(x)["iteration"] for x in mine["metrics.jsonl"].splitlines()] == [1, 2, 3, 4]
    assert torch.equal(mine["head"], alone["head"]) and strip(mine["metrics.jsonl"]) == strip(alone["metrics.jsonl"])


TRIGGERS = {"model": "runs", "config.json": "run/config.json", "checkpoint": "run/checkpoint/state.json"}


@pytest.mark.parametrize("when", ["at once", "model", "config.json", "checkpoint"])
def test_overwrite_never_mixes_two_live_runs(tmp_path, when, solo):
    """A second run with --overwrite (another seed) while the first trains: refused in one line, and
    the first run's outputs equal those of the same run alone. Started at once, either may take the
    run directory first: the other is refused, and the winner's outputs equal its run alone. Else the
    first is held stopped (as a loaded machine deschedules it) while the second tries: while it builds
    its model (the tiny backbone's folder appears; it must hold --out by then), after config.json,
    after its first checkpoint."""
    first = start(str(tmp_path / "run"))
    if when != "at once":
        wait_for(str(tmp_path / TRIGGERS[when]), first)
        first.send_signal(signal.SIGSTOP)
    try:
        second = start(str(tmp_path / "run"), "--overwrite", "--seed", "1")
        out2, err2 = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    out1, err1 = first.communicate(timeout=300)
    (loser, err), (winner, out, seed) = ((second, err2), (first, out1, 0)) if second.returncode == 2 else \
        ((first, err1), (second, out2, 1))
    if when != "at once":
        assert loser is second, err2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert loser.returncode == 2 and len(errors) == 1 and "another process is writing this output" in errors[0], err
    assert winner.returncode == 0 and "PRM saved to" in out, (err1, err2)
    same_run(outputs(str(tmp_path / "run")), solo(seed))


def test_a_run_whose_folder_is_replaced_reports_no_success(tmp_path, capsys, monkeypatch):
    """The folder removed and remade under a live run: the run stops in one line at its next save."""
    out = str(tmp_path / "run")
    real = bt.save_checkpoint

    def replace_then_save(run_dir, *args):
        if args[-2] == 2:                                      # iteration 2: someone else takes the folder
            shutil.rmtree(run_dir)
            os.makedirs(run_dir)
            open(os.path.join(run_dir, "run.lock"), "w").close()
        return real(run_dir, *args)
    monkeypatch.setattr(bt, "save_checkpoint", replace_then_save)
    code = bt.cli(SOLO + ["--out", out])
    captured = capsys.readouterr()
    assert code == 2 and "the run directory was removed or replaced while this run trained" in captured.err
    assert "PRM saved" not in captured.out and not os.path.exists(os.path.join(out, "prm"))


def test_a_run_stopped_by_bad_input_leaves_no_folder(tmp_path, capsys):
    code = bt.cli(["--train", str(tmp_path / "missing.jsonl"), "--meta", str(tmp_path / "m.jsonl"),
                   "--out", str(tmp_path / "run")])
    assert code == 2 and "no such file" in capsys.readouterr().err and not (tmp_path / "run").exists()


# -- 3 and 6. servers that cut a reply or stall ---------------------------------------------------------

class CutServer(BaseHTTPRequestHandler):
    """Promises a longer body than it sends, then closes: http.client's IncompleteRead."""
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b'{"choices": [')
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


class TrickleServer(BaseHTTPRequestHandler):
    """Sends its reply one byte every 0.5 s: each read succeeds, the whole never arrives in time."""
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(40):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_reply_cut_mid_body_is_retried_then_one_line(tmp_path, capsys):
    server = serve(CutServer)
    q = write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "domain": "d", "question": "3 + 4?", "answer": "7"}])
    try:
        code, _, err = run(gen_cots, ["--questions", q, "--out", str(tmp_path / "c.jsonl"), "--policy", "openai",
                                      "--retries", "1", "--base-url", f"http://127.0.0.1:{server.server_port}/v1"],
                           capsys)
    finally:
        server.shutdown()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "IncompleteRead" in errors[0] and "after 2 tries" in errors[0], err
    assert "attempt 1 of 2 failed" in err


def test_timeout_bounds_the_whole_request(capsys):
    server = serve(TrickleServer)
    policy = policy_from_flags("--policy", "openai", "--base-url", f"http://127.0.0.1:{server.server_port}/v1",
                               "--model-name", "m", "--retries", "0", "--timeout", "2")
    t0 = time.monotonic()
    try:
        with pytest.raises(gen_cots.PolicyError, match="TimeoutError: no complete reply within --timeout 2 s"):
            policy.request({"n": 1, "model": "m", "messages": []})
    finally:
        server.shutdown()
    assert time.monotonic() - t0 < 3.0


# -- 4. a full disk while saving ------------------------------------------------------------------------

def test_a_full_disk_while_saving_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError
    out = str(tmp_path / "run")
    real = prm.save_file
    calls = []

    def fill_up(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 4:                               # two checkpoints (two files each) fit, the third not
            real(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(10)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(prm, "save_file", fill_up)
    code = bt.cli(SOLO + ["--out", out])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and err == [f"error: no space left on the device writing {out}/checkpoint.tmp/model.safetensors: "
                                 "free space and rerun the same command with --resume"], err
    assert json.load(open(os.path.join(out, "checkpoint", "state.json")))["iteration"] == 2
    monkeypatch.setattr(prm, "save_file", real)
    assert bt.cli(SOLO + ["--out", out, "--resume"]) == 0                 # the kept checkpoint loads
    assert "resumed" in capsys.readouterr().out


# -- 5. an unfinished run given to rerank.py ------------------------------------------------------------

def test_rerank_names_an_unfinished_run(tmp_path, saved_prm, capsys, monkeypatch):
    out = str(tmp_path / "run")
    assert bt.cli(SOLO + ["--out", out]) == 0
    capsys.readouterr()
    shutil.rmtree(os.path.join(out, "prm"))                             # as a run stopped before its end
    cots = write_jsonl(tmp_path / "t.jsonl", [labels_row("q", "Q?", None, sample=s, correct=s == 0) for s in range(2)])
    code, _, err = run(rerank, ["--cots", cots, "--prm", out, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "a bilevel_train.py run that has not finished (no prm/ yet)" in err and \
        "--resume" in err and err.count("\n") == 1, err
