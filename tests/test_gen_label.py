"""gen_cots.py and mc_label.py: toy pipeline, kill and resume, openai and hf back ends, matching."""
import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import gen_cots
import mc_label
import prm
from conftest import kill_after_lines, policy_from_flags
from engine_server import send_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def label_cot(cot, policy, K, min_rollouts=0, zero_stop=False, max_steps=None):
    """mc_label.label_steps for one CoT, its requests sent to the policy by gen_cots.drive."""
    out = []
    gen_cots.drive(policy, [mc_label.label_steps(cot, K, min_rollouts, zero_stop, max_steps)], out.append, 1)
    return out[0]


def test_toy_pipeline_labels_drop_after_planted_error(small_toy):
    cots = prm.read_cots(str(small_toy / "train_cots.jsonl"), "cots", fmt="ours")[0]
    assert len(cots) == 4 * 4 * len(gen_cots.TOY_DOMAINS)
    assert all(len(c["steps"]) == 5 and c["final"] for c in cots)
    assert mc_label.main(["--cots", str(small_toy / "train_cots.jsonl"), "--rollouts", "16"]) == 0
    labels = prm.read_cots(str(small_toy / "train_labels.jsonl"), "labels", fmt="ours")[0]
    assert len(labels) == len(cots)
    misread = [r for r in labels if "I guess" in r["steps"][1] and r["domain"] == "clean"]
    assert misread, "the toy policy plants misreads"
    before = sum(r["mc"][0] for r in misread) / len(misread)
    after = sum(r["mc"][2] for r in misread) / len(misread)
    assert after < before - 0.2
    for r in labels:
        assert r["mc"][-1] == float(r["correct"]) and r["rollouts"][-1] == 0 and r["rollouts"][0] == 16


def test_adaptive_and_zero_stop(small_toy):
    cot = prm.read_cots(str(small_toy / "train_cots.jsonl"), "cots", fmt="ours")[0][0]
    policy = gen_cots.ToyPolicy(0)
    easy = dict(cot, toy=dict(cot["toy"], domain="easy"))          # the easy policy never errs
    mc, counts = label_cot(easy, policy, K=16, min_rollouts=4)
    assert counts[:-1] == [4, 4, 4, 4] and mc[:-1] == [1.0] * 4
    mc, counts = label_cot(easy, policy, K=3, max_steps=2)  # the step cap: rollouts for both
    assert mc == [1.0, 1.0] and counts == [3, 3]
    wrong = dict(cot, answer="-1", correct=False)                   # no rollout can reach this key
    calls = []
    counting = gen_cots.ToyPolicy(0)
    counting.sample = lambda prompts, n: calls.append(len(prompts) * n) or policy.sample(prompts, n)
    mc, counts = label_cot(wrong, counting, K=8, zero_stop=True)
    assert mc == [0.0] * 5 and counts == [8, 0, 0, 0, 0] and calls == [8]     # later prefixes never rolled
    mc, counts = label_cot(wrong, counting, K=8)
    assert counts == [8, 8, 8, 8, 0] and calls == [8, 32]                      # all prefixes in one call


def test_mc_label_killed_and_resumed_gives_the_same_records(small_toy, tmp_path):
    cots = str(small_toy / "train_cots.jsonl")
    args = [sys.executable, os.path.join(ROOT, "mc_label.py"), "--cots", cots, "--rollouts", "64"]
    full = str(tmp_path / "full.jsonl")
    subprocess.run(args + ["--out", full], check=True, capture_output=True)
    cut = str(tmp_path / "cut.jsonl")
    n_cut = kill_after_lines(args, cut, 5)
    with open(cut, "a") as f:
        f.write('{"id": "train-clean-3", "sam')                     # a torn last line, as a crash leaves
    subprocess.run(args + ["--out", cut], check=True, capture_output=True)
    lines = open(cut).read().splitlines()
    assert n_cut < len(lines)
    assert sorted(lines) == sorted(open(full).read().splitlines())


class ChatServer(BaseHTTPRequestHandler):
    """A chat-completions endpoint: the first request gets 429, then n answers per request."""
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatServer.requests.append((dict(self.headers), body))
        if len(ChatServer.requests) == 1:
            self.send_response(429)
            self.end_headers()
            return
        choices = [{"index": i, "message": {"role": "assistant",
                                            "content": f"Step 1: look.\nStep 2: add.\nFinal answer: {7 + i % 2}"}}
                   for i in range(body["n"])]
        send_json(self, {"choices": choices})

    def log_message(self, *args):
        pass


def write_questions(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_openai_back_end(tmp_path, images, monkeypatch, capsys):
    ChatServer.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "sk-test-secret-4242"
    monkeypatch.setenv("TEST_KEY", secret)
    q = write_questions(tmp_path / "q.jsonl", [{"id": "a", "domain": "d", "question": "3 + 4?", "answer": "7",
                                                 "image": images[0]}])
    out = str(tmp_path / "cots.jsonl")
    try:
        code = gen_cots.main(["--questions", q, "--out", out, "--policy", "openai", "--n", "3",
                              "--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--model-name", "m",
                              "--api-key-env", "TEST_KEY", "--retries", "2"])
    finally:
        server.shutdown()
    assert code == 0
    headers, body = ChatServer.requests[-1]
    assert len(ChatServer.requests) == 2                           # one 429, then success
    assert headers["Authorization"] == f"Bearer {secret}" and body["n"] == 3 and body["model"] == "m"
    image_part = body["messages"][0]["content"][0]
    assert image_part["type"] == "image_url"
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == open(images[0], "rb").read()
    assert "Step 1: Restate the question." in body["messages"][0]["content"][1]["text"]
    records = [json.loads(x) for x in open(out)]
    assert [r["correct"] for r in records] == [True, False, True] and records[0]["steps"] == ["Step 1: look.", "Step 2: add."]
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err + open(out).read()
    # Continuing a prefix: the prefix goes as the final assistant message.
    body = policy_from_flags("--policy", "openai", "--base-url", "http://x/v1", "--model-name", "m").payload({"question": {"question": "q?"}, "prefix": "Step 1: a"}, 2)
    assert body["messages"][-1] == {"role": "assistant", "content": "Step 1: a"} and body["continue_final_message"]


def test_unreachable_server_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    q = write_questions(tmp_path / "q.jsonl", [{"id": "a", "domain": "d", "question": "3 + 4?", "answer": "7"}])
    out = tmp_path / "cots.jsonl"
    code = prm.run_cli(gen_cots.main, ["--questions", q, "--out", str(out), "--policy", "openai", "--retries", "1",
                                       "--base-url", "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and "request failed after 2 tries" in errors[0] and "Traceback" not in err
    assert not out.exists() or out.read_text() == ""


def test_hf_back_end_with_the_tiny_backbone(tmp_path, images, backbone_dir):
    q = write_questions(tmp_path / "q.jsonl", [
        {"id": "a", "domain": "d", "question": "3 + 4?", "answer": "7", "image": images[0]},
        {"id": "b", "domain": "d", "question": "2 + 2?", "answer": "4", "image": None}])
    out = str(tmp_path / "cots.jsonl")
    assert gen_cots.main(["--questions", q, "--out", out, "--policy", "hf", "--model", backbone_dir,
                          "--n", "2", "--max-tokens", "12"]) == 0
    records = [json.loads(x) for x in open(out)]
    assert [(r["id"], r["sample"]) for r in records] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert all(r["policy"].startswith("hf:") and isinstance(r["correct"], bool) for r in records)


@pytest.mark.parametrize("pred,answer,choices,ok", [
    ("B", "B", ["cat", "dog"], True), ("(b)", "B", ["cat", "dog"], True), ("B.", "B", ["cat", "dog"], True),
    ("The answer is dog", "B", ["cat", "dog"], True), ("Dog", "dog", ["cat", "dog"], True),
    ("A", "B", ["cat", "dog"], False), ("cat", "B", ["cat", "dog"], False),
    ("a dgo", "B", ["a cat", "a dog"], True), ("B: dog", "B", ["cat", "dog"], True),
    ("42", "42", None, True), ("42.0", "42", None, True), ("41", "42", None, False),
    ("3.14159", "3.14", None, True), ("3.2", "3.14", None, False), ("1,000", "1000", None, True),
    ("12 cm", "12", None, True), ("  Paris ", "paris", None, True), ("Lyon", "Paris", None, False),
])
def test_answer_matching(pred, answer, choices, ok):
    assert prm.match_answer(pred, answer, choices) is ok


@pytest.mark.parametrize("rows,words", [
    ([{"id": "a", "domain": "d", "question": "q?", "answer": "1"}] * 2, "duplicate record: the same question id 'd/a' as"),
    ([{"id": "a", "domain": "d", "question": "  ", "answer": "1"}], "empty question"),
    ([{"id": "a", "domain": "d", "question": "q?", "answer": "1", "image": "missing.png"}], "no such image file"),
])
def test_gen_bad_input(tmp_path, capsys, rows, words):
    q = write_questions(tmp_path / "q.jsonl", rows)
    code = prm.run_cli(gen_cots.main, ["--questions", q, "--out", str(tmp_path / "c.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "q.jsonl:" in err and err.count("\n") == 1
    assert not (tmp_path / "c.jsonl").exists()


def test_mc_label_rejects_cots_it_could_not_resume(tmp_path, capsys):
    row = {"id": "a", "domain": "d", "question": "q?", "answer": "1", "steps": ["Step 1: x"], "final": "1",
           "correct": True}
    path = write_questions(tmp_path / "cots.jsonl", [row, row])          # two CoTs, no sample numbers
    code = prm.run_cli(mc_label.main, ["--cots", path, "--out", str(tmp_path / "l.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "cots.jsonl:2: duplicate record: the same question id and sample 'd/a#0' as " in err
    assert not (tmp_path / "l.jsonl").exists()


def test_max_tokens_defaults_to_64_for_the_tiny_backbone_only():
    ap = prm.Parser("policy flags")
    prm.add_options(ap, gen_cots.Policy)
    max_tokens = lambda *argv: gen_cots.fill_policy_presets(ap.parse_args(list(argv))).max_tokens
    assert max_tokens("--policy", "hf", "--model", "tiny") == 64
    assert max_tokens("--policy", "hf", "--model", "/models/policy") == 512 and max_tokens() == 512
    assert max_tokens("--policy", "openai", "--model", "tiny") == 512
    assert max_tokens("--policy", "hf", "--model", "tiny", "--max-tokens", "9") == 9           # a flag wins
