"""No mixed outputs, no silent partial results, no files read from outside the data: each fault is
one clear line (exit 2; 1 for a full disk; 130 for Ctrl-C), and nothing stale is kept."""
import errno
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file, save_file

import bilevel_train as bt
import gen_cots
import mc_label
import prm
import rerank
from conftest import policy_from_flags
from engine_server import send_json
from test_formats import labels_row, train_meta, write_jsonl  # noqa: F401 (a fixture)


def run(script, args, capsys):
    code = prm.run_cli(script.main, args)
    return code, capsys.readouterr().err


# -- images stay inside the image root, and decode ------------------------------------------------

def test_image_paths_stay_inside_the_root(tmp_path, images):
    data = tmp_path / "data"
    data.mkdir()
    (data / "link.png").symlink_to(images[0])                       # a link that leads out
    rows = [labels_row("a", "Q?", "../img0.png"), labels_row("b", "Q2?", images[1]), labels_row("c", "Q3?", "link.png")]
    for k, row in enumerate(rows):
        path = write_jsonl(data / f"f{k}.jsonl", [row])
        with pytest.raises(prm.DataError, match="leads outside the image root .*--allow-outside-images"):
            prm.read_cots(path, "labels")
        (r,), _ = prm.read_cots(path, "labels", outside_images=True)
        assert r["_image"]
    shutil.copy(images[0], data / "inside.png")
    (r,), _ = prm.read_cots(write_jsonl(data / "ok.jsonl", [labels_row("d", "Q4?", "inside.png")]), "labels")
    assert r["_image"] == str(data / "inside.png")


def test_the_dreamprm15_layout_reads_without_the_flag(tmp_path, images):
    """data/meta_MMMU_Pro.json names its images ../data/meta_images/NAME.png: inside data/."""
    (tmp_path / "data" / "meta_images").mkdir(parents=True)
    shutil.copy(images[0], tmp_path / "data" / "meta_images" / "x.png")
    row = labels_row("a", "Q?", "../data/meta_images/x.png")
    (r,), _ = prm.read_cots(write_jsonl(tmp_path / "data" / "m.jsonl", [row]), "labels")
    assert r["_image"] == str(tmp_path / "data" / "meta_images" / "x.png")


@pytest.mark.parametrize("damage,words", [("truncate", "does not decode"), ("text", "does not decode"),
                                          ("thin", "aspect ratio over 200")])
def test_images_must_decode(tmp_path, images, damage, words):
    from PIL import Image
    bad = tmp_path / f"bad-{damage}.png"
    if damage == "truncate":
        bad.write_bytes(open(images[2], "rb").read()[:200])
    elif damage == "text":
        bad.write_text("not a picture")
    else:
        Image.new("RGB", (3000, 4)).save(bad)
    with pytest.raises(prm.DataError, match=words):
        prm.read_cots(write_jsonl(tmp_path / "x.jsonl", [labels_row("a", "Q?", bad.name)]), "labels")


# -- strict PRM directories -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_prm(tmp_path_factory, backbone_dir):
    path = str(tmp_path_factory.mktemp("prm") / "prm")
    prm.PRM.from_backbone(backbone_dir).save_pretrained(path)
    return path


def edit_json(path, **changes):
    meta = json.load(open(path))
    meta.update(changes)
    json.dump(meta, open(path, "w"))


@pytest.mark.parametrize("case,words", [
    ("extra tensor", "unknown tensor(s) head.extra"),
    ("nan head", "head.weight holds NaN"),
    ("format", "field 'format': 99: expected 1 or 2"),
    ("final rule", "field 'final_answer': 'bogus': expected last-step or drop"),
    ("max_side", "field 'max_side': -1: expected an integer >= 0 or null"),
    ("max_length", "field 'max_length': '5': expected an integer >= 1"),
    ("aggregation", "field 'aggregation': 'median': expected mean_logit"),
    ("not an object", "prm.json: must be a JSON object"),
    ("pickle", "no safetensors weights (found pytorch_model.bin: pickle files are never loaded"),
])
def test_strict_prm_directories(tmp_path, saved_prm, case, words):
    d = str(tmp_path / "prm")
    shutil.copytree(saved_prm, d)
    head, meta = os.path.join(d, "prm.safetensors"), os.path.join(d, "prm.json")
    if case in ("extra tensor", "nan head"):
        t = load_file(head)
        if case == "extra tensor":
            t["head.extra"] = torch.zeros(1)
        else:
            t["head.weight"][0, 0] = float("nan")
        save_file(t, head)
    elif case == "not an object":
        json.dump([1, 2], open(meta, "w"))
    elif case == "pickle":
        os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin"))
    else:
        key, value = {"format": ("format", 99), "final rule": ("final_answer", "bogus"), "max_side": ("max_side", -1),
                      "max_length": ("max_length", "5"), "aggregation": ("aggregation", "median")}[case]
        edit_json(meta, **{key: value})
    with pytest.raises(prm.DataError) as info:
        prm.PRM.from_pretrained(d)
    assert words in str(info.value) and "\n" not in str(info.value)


# -- the policy server: every answer checked, every count kept -------------------------------------

@pytest.mark.parametrize("body,words", [
    ({"choices": [{"index": 0, "message": {"content": "x"}}]}, "1 choices where 2 were asked"),
    ({"choices": [{"message": {"content": None}}, {"message": {"content": "y"}}]}, "a choice without text content"),
    ({"choices": "x y"}, "no list of choices"), ([1, 2], "no list of choices"), ({}, "no list of choices"),
])
def test_choice_texts_refuses_malformed_answers(body, words):
    with pytest.raises(ValueError, match=words):
        gen_cots.choice_texts(body, 2)
    assert gen_cots.choice_texts({"choices": [{"index": 1, "message": {"content": "b"}},
                                              {"index": 0, "message": {"content": "a"}}]}, 2) == ["a", "b"]


class ShortServer(BaseHTTPRequestHandler):
    """Answers every request with one choice, whatever n was asked."""
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        send_json(self, {"choices": [{"index": 0, "message": {"content": "Final answer: 7"}}]})

    def log_message(self, *args):
        pass


def test_fewer_choices_than_asked_is_an_error_not_a_record(tmp_path, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), ShortServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        q = write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "domain": "d", "question": "3 + 4?", "answer": "7"}])
        out = tmp_path / "cots.jsonl"
        code, err = run(gen_cots, ["--questions", q, "--out", str(out), "--policy", "openai", "--n", "3",
                                   "--retries", "1", "--base-url", f"http://127.0.0.1:{server.server_port}/v1"],
                        capsys)
    finally:
        server.shutdown()
    errors = [line for line in err.splitlines() if "error" in line]       # (the progress bar shares stderr)
    assert code == 2 and len(errors) == 1 and "1 choices where 3 were asked" in errors[0], err
    assert out.read_text() == ""                                       # nothing written as complete


def test_hf_policy_samples_as_asked_whatever_the_generation_config(tmp_path, backbone_dir):
    """A model whose generation_config.json says greedy (top_k 1, as Qwen2-VL-2B-Instruct's does)
    still samples at --temperature 1; --temperature 0 is greedy: every sample the same text."""
    d = str(tmp_path / "greedy")
    shutil.copytree(backbone_dir, d)
    edit_json(os.path.join(d, "generation_config.json"), top_k=1, top_p=0.001, do_sample=False)
    policy = policy_from_flags("--policy", "hf", "--model", d, "--temperature", "1.0", "--max-tokens", "8")
    prompt = {"question": {"question": "3 + 4?", "_image": None}, "prefix": ""}
    torch.manual_seed(0)
    assert len(set(policy.sample([prompt], 6)[0])) > 1
    policy.temperature = 0.0
    texts = policy.sample([prompt], 3)[0]
    assert len(texts) == 3 and len(set(texts)) == 1


# -- reruns and resumes check content ------------------------------------------------------------

def questions(toy, answer=None):
    """Two toy questions beside the toy images, the first one's answer key replaced when asked."""
    rows = [json.loads(x) for x in open(toy / "test_questions.jsonl")][:2]
    if answer is not None:
        rows[0]["answer"] = answer
    return write_jsonl(toy / "q.jsonl", rows)


def test_gen_cots_reruns_check_inputs_and_outputs(small_toy, tmp_path, capsys):
    q, out = questions(small_toy), str(tmp_path / "cots.jsonl")
    key = json.loads(open(q).readline())["answer"]
    assert run(gen_cots, ["--questions", q, "--out", out, "--n", "2"], capsys)[0] == 0
    code, err = run(gen_cots, ["--questions", questions(small_toy, "99"), "--out", out, "--n", "2"], capsys)
    assert code == 2 and f"made with another answer ({key!r}, now '99')" in err, err
    os.remove(out + ".params.json")
    code, err = run(gen_cots, ["--questions", questions(small_toy), "--out", out, "--n", "2", "--seed", "3"], capsys)
    assert code == 2 and "holds records but no .params.json" in err, err
    code, err = run(gen_cots, ["--questions", q, "--out", q], capsys)
    assert code == 2 and "the output is the input file" in err, err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run(gen_cots, ["--questions", str(empty), "--out", str(tmp_path / "e.jsonl")], capsys)
    assert code == 2 and "no questions in the file" in err, err


def test_mc_label_refuses_its_input_as_output_and_changed_keys(small_toy, tmp_path, capsys):
    q, cots = questions(small_toy), str(small_toy / "two_cots.jsonl")
    assert run(gen_cots, ["--questions", q, "--out", cots, "--n", "2"], capsys)[0] == 0
    code, err = run(mc_label, ["--cots", cots, "--out", cots], capsys)
    assert code == 2 and "the output is the input file" in err, err
    labels = str(tmp_path / "labels.jsonl")
    assert run(mc_label, ["--cots", cots, "--out", labels, "--rollouts", "2"], capsys)[0] == 0
    rows = [json.loads(x) for x in open(cots)]
    write_jsonl(small_toy / "two_cots.jsonl", [dict(r, answer="99") for r in rows])
    code, err = run(mc_label, ["--cots", cots, "--out", labels, "--rollouts", "2"], capsys)
    assert code == 2 and "made with another answer" in err, err


# -- one writer per output, caches keyed by content ----------------------------------------------

def test_rerank_has_one_writer_and_never_mixes_prms(tmp_path, saved_prm, monkeypatch, capsys):
    rows = [dict(labels_row("q1", "Q one?", None, sample=s, correct=s == 0)) for s in range(3)] + \
           [dict(labels_row("q2", "Q two?", None, sample=s, correct=s == 1)) for s in range(3)]
    cots, out, d = write_jsonl(tmp_path / "test.jsonl", rows), tmp_path / "out", str(tmp_path / "prm")
    shutil.copytree(saved_prm, d)
    args = ["--cots", cots, "--prm", d, "--names", "p", "--out", str(out)]
    out.mkdir()
    with prm.output_lock(str(out / "scores.jsonl")):
        code, err = run(rerank, args, capsys)
    assert code == 2 and "another process is writing this output" in err
    real = rerank.write_outputs
    monkeypatch.setattr(rerank, "write_outputs", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert run(rerank, args, capsys)[0] == 130                         # killed after scoring: parts stay behind
    monkeypatch.setattr(rerank, "write_outputs", real)
    t = load_file(os.path.join(d, "prm.safetensors"))
    t["head.bias"] += 3.0                                             # "retrained"
    save_file(t, os.path.join(d, "prm.safetensors"))
    assert run(rerank, args, capsys)[0] == 0
    fresh = tmp_path / "fresh"
    assert run(rerank, args[:-1] + [str(fresh)], capsys)[0] == 0
    assert (out / "scores.jsonl").read_text() == (fresh / "scores.jsonl").read_text()


def test_rerank_with_nothing_scored_reports_no_accuracy(tmp_path, saved_prm, capsys):
    d = str(tmp_path / "prm")
    shutil.copytree(saved_prm, d)
    edit_json(os.path.join(d, "prm.json"), max_length=3)
    cots = write_jsonl(tmp_path / "t.jsonl", [labels_row("q", "Q?", None, sample=s, correct=s == 0) for s in range(2)])
    code, err = run(rerank, ["--cots", cots, "--prm", d, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "no CoT fits the PRM's max_length" in err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.fixture
def run_data(train_meta):  # noqa: F811 (the fixture of test_formats)
    train, meta = train_meta
    return ["--train", train, "--meta", meta, "--model", "tiny", "--iterations", "2", "--unroll-steps", "1",
            "--train-batch", "2", "--meta-batch", "2", "--save-every", "1"]


def test_bilevel_run_directory_is_guarded(tmp_path, run_data, capsys):
    out = str(tmp_path / "run")
    base = run_data + ["--out", out]
    assert run(bt, base, capsys)[0] == 0
    with prm.output_lock(os.path.join(out, "run")):                    # a live run holds it
        code, err = run(bt, base + ["--overwrite"], capsys)
    assert code == 2 and "another process is writing" in err, err
    code, err = run(bt, base + ["--overwrite", "--max-length", "5"], capsys)
    assert code == 2 and "--max-length" in err and os.path.isdir(os.path.join(out, "prm")), err   # old run kept
    rows = [json.loads(x) for x in open(run_data[1])]
    write_jsonl(tmp_path / "train.jsonl", [dict(r, mc=[0.5, 0.5]) for r in rows])   # same path, same count
    code, err = run(bt, base + ["--resume", "--iterations", "3"], capsys)
    assert code == 2 and "train_digest" in err, err


@pytest.mark.parametrize("damage,words", [("drop tensor", "lacks or misshapes"), ("truncate", "unreadable"),
                                          ("state.json", "damaged"), ("config.json", "missing")])
def test_damaged_checkpoints_are_one_error(tmp_path, run_data, capsys, damage, words):
    out = str(tmp_path / "run")
    base = run_data + ["--out", out]
    assert run(bt, base, capsys)[0] == 0
    ck = os.path.join(out, "checkpoint")
    if damage == "drop tensor":
        t = load_file(os.path.join(ck, "model.safetensors"))
        t.pop(sorted(t)[0])
        save_file(t, os.path.join(ck, "model.safetensors"))
    elif damage == "truncate":
        data = open(os.path.join(ck, "state.safetensors"), "rb").read()
        open(os.path.join(ck, "state.safetensors"), "wb").write(data[:len(data) // 2])
    elif damage == "state.json":
        open(os.path.join(ck, "state.json"), "w").write("{garbage")
    else:
        os.remove(os.path.join(out, "config.json"))
    code, err = run(bt, base + ["--resume", "--iterations", "3"], capsys)
    assert code == 2 and words in err and err.count("\n") == 1, err


# -- the command line -----------------------------------------------------------------------------

def test_interrupts_full_disks_and_devices(tmp_path, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "out.jsonl")
    assert prm.run_cli(interrupted) == 130 and "rerun the same command to resume" in capsys.readouterr().err
    assert prm.run_cli(full) == 1 and "free space and rerun" in capsys.readouterr().err
    with pytest.raises(prm.DataError, match="unknown device 'bogus'"):
        prm.pick_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(prm.DataError, match="no such CUDA device"):
            prm.pick_device("cuda")
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100000 + "\n")
    with pytest.raises(prm.DataError):
        prm.read_cots(str(deep), "labels")


def test_under_torchrun_each_process_takes_its_own_gpu(monkeypatch):
    """torchrun with 2 processes on a machine of 2 GPUs (CUDA's answers faked): LOCAL_RANK picks the
    GPU; an explicit index, or more processes than GPUs, is one clear line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert prm.pick_device("cuda") == prm.pick_device("auto") == torch.device("cuda", 1)
    assert prm.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(prm.DataError, match="each process takes the GPU of its LOCAL_RANK"):
        prm.pick_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(prm.DataError, match="more processes on this machine than it has GPUs"):
        prm.pick_device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert prm.pick_device("cuda:1") == torch.device("cuda", 1)


def test_an_interrupted_bilevel_run_says_resume_with_the_flag(monkeypatch, capsys):
    """A checkpointed run refuses the same command without --resume: Ctrl-C and a full disk both say it."""
    def interrupted(argv):
        raise KeyboardInterrupt

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "run/checkpoint.tmp/model.safetensors")
    monkeypatch.setattr(bt, "main", interrupted)
    assert bt.cli([]) == 130 and "rerun the same command with --resume" in capsys.readouterr().err
    monkeypatch.setattr(bt, "main", full)
    assert bt.cli([]) == 1 and "free space and rerun the same command with --resume" in capsys.readouterr().err


# -- the new user's path: defaults that cannot mix runs, output that says what happens ---------------

def test_defaults_never_mix_runs(tmp_path, run_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bt.parse_args(["--synthetic"]).out == "runs/synthetic" and bt.parse_args([]).out == "runs/toy"
    args = bt.parse_args(run_data[:4] + ["--weighting", "fixed"])
    assert args.out == "runs/train-fixed"
    code, err = run(gen_cots, [], capsys)
    assert code == 2 and "give --questions FILE, or --toy" in err
    code, err = run(rerank, ["--cots", run_data[1]], capsys)
    assert code == 2 and "give the PRMs to compare (--prm DIR ...)" in err
    code, out = bt.main(run_data), capsys.readouterr().out                  # a real-data run: losses every log
    assert code == 0 and os.path.isdir("runs/train-domain/prm") and "iteration 2: lower/loss" in out
    assert "upper/loss" in out and "alpha/ai2d" in out


class DownServer(BaseHTTPRequestHandler):
    def do_POST(self):
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_failed_first_run_can_be_rerun_with_other_parameters(small_toy, tmp_path, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), DownServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    q, out = questions(small_toy), str(tmp_path / "cots.jsonl")
    try:
        code, err = run(gen_cots, ["--questions", q, "--out", out, "--policy", "openai", "--retries", "0",
                                   "--base-url", f"http://127.0.0.1:{server.server_port}"], capsys)
    finally:
        server.shutdown()
    assert code == 2 and "HTTP 404" in err and "usually ends in /v1" in err, err
    assert run(gen_cots, ["--questions", q, "--out", out, "--n", "2"], capsys)[0] == 0     # toy now: no record before
    assert len(open(out).read().splitlines()) == 4


def test_retries_say_what_failed(monkeypatch, capsys):
    policy = policy_from_flags("--policy", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model-name", "m",
                               "--retries", "1", "--timeout", "1")
    policy.backoff = 0.0
    with pytest.raises(gen_cots.PolicyError):
        policy.request({"n": 1})
    err = capsys.readouterr().err
    assert "attempt 1 of 2 failed, next in 0 s" in err


@pytest.mark.parametrize("field,value,words", [
    ("final", 7, "field 'final': wrong type int"), ("final", ["7"], "field 'final': wrong type list"),
    ("sample", [0], "field 'sample': [0] is not a sample number"), ("sample", -1, "field 'sample': -1 is not"),
    ("toy", "x", "field 'toy': wrong type str"), ("pred", 3, "field 'pred': wrong type int"),
])
def test_fields_of_the_wrong_type_are_one_line(tmp_path, field, value, words):
    path = write_jsonl(tmp_path / "c.jsonl", [dict(labels_row("a", "Q?"), **{field: value})])
    with pytest.raises(prm.DataError) as info:
        prm.read_cots(path, "labels")
    assert words in str(info.value) and "c.jsonl:1" in str(info.value)
