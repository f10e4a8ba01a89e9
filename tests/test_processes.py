"""More than one process (torchrun): rerank.py splits its questions across processes and process 0
writes the same outputs as one process; the stages that run as one process refuse torchrun in one
line, said once."""
import json
import os
import subprocess
import sys

import pytest

import gen_cots
import mc_label
import prm
import rerank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, processes, tmp_path):
    """A script run as one process, or under torchrun with `processes` (one thread each, as torchrun
    sets them); returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return subprocess.run(launch + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, backbone_dir):
    """A toy test set (with images, correctness and MC labels) scored by one process and by two."""
    import gen_cots as g
    tmp = tmp_path_factory.mktemp("processes")
    saved = dict(g.TOY_SETS)
    g.TOY_SETS.update(train={d: 2 for d in g.TOY_DOMAINS}, meta=2, test=7)
    try:
        assert g.main(["--toy", "--toy-dir", str(tmp / "toy"), "--n", "4"]) == 0
    finally:
        g.TOY_SETS.clear()
        g.TOY_SETS.update(saved)
    prm.PRM.from_backbone(backbone_dir).save_pretrained(str(tmp / "prm"))
    cots = str(tmp / "toy" / "test_cots.jsonl")
    outs = {}
    for n in (1, 2):
        outs[n] = tmp / f"out{n}"
        done = run(["rerank.py", "--cots", cots, "--prm", str(tmp / "prm"), "--names", "p", "--out", str(outs[n])],
                   n, tmp)
        assert done.returncode == 0, done.stderr[-3000:]
    return outs


def test_two_processes_write_what_one_writes(scored):
    """(e) torchrun rerank.py on 2 processes: scores.jsonl, picks.jsonl and results.md byte for byte
    those of one process, and no part file left behind."""
    for name in ("scores.jsonl", "picks.jsonl", "results.md"):
        one, two = (scored[n] / name for n in (1, 2))
        assert one.read_bytes() == two.read_bytes(), name
    assert len((scored[1] / "scores.jsonl").read_text().splitlines()) == 28              # 7 questions x 4 CoTs
    assert sorted(os.listdir(scored[2])) == sorted(os.listdir(scored[1]))


def test_a_bad_file_under_torchrun_is_one_line_from_process_0(tmp_path, backbone_dir):
    """(f) A bad input line under torchrun: one error line in all (process 0's), exit code 2 from each
    process, nothing written."""
    bad = tmp_path / "cots.jsonl"
    bad.write_text(json.dumps({"id": "q", "domain": "t", "question": "Q?", "answer": "1", "sample": 0, "image": None,
                               "steps": ["Step 1: a"], "final": "1", "correct": True}) + "\n{not json\n")
    prm.PRM.from_backbone(backbone_dir).save_pretrained(str(tmp_path / "prm"))
    done = run(["rerank.py", "--cots", str(bad), "--prm", str(tmp_path / "prm"), "--out", str(tmp_path / "out")],
               2, tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]     # error (process 1): too
    assert done.returncode != 0 and len(errors) == 1 and f"{bad}:2" in errors[0], done.stderr[-3000:]
    assert "exitcode: 2" in done.stderr or "exitcode  : 2" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out" / "scores.jsonl").exists()


@pytest.mark.parametrize("main,argv", [(gen_cots.main, ["--toy"]), (mc_label.main, [])])
def test_one_process_stages_refuse_torchrun_once(main, argv, monkeypatch, capsys, tmp_path):
    """gen_cots.py and mc_label.py (their scale-out is a serving engine) under torchrun: exit 2 and
    one line from process 0; nothing written. Process 1 waits for process 0's exit to stop it, and
    speaks only if it outlives the wait (here 0.1 s; torchrun's tests above see process 0's line only)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prm, "OTHERS_WAIT", 0.1)
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        assert prm.run_cli(main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: " if rank == 0 else "error (process 1): ") \
            and "runs as one process, not 2 under torchrun" in err[0]
    assert os.listdir(tmp_path) == []


def bilevel(out, processes, tmp_path, backbone_dir, *extra):
    """A short bi-level run of the synthetic set (3 outer iterations of U = 2) on 1 or 2 processes."""
    done = run(["bilevel_train.py", "--synthetic", "--model", backbone_dir, "--iterations", "3", "--unroll-steps", "2",
                "--train-batch", "4", "--meta-batch", "4", "--save-every", "1", "--no-baseline", "--out", str(out)]
               + list(extra), processes, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def straight(tmp_path_factory, backbone_dir):
    """The plain bi-level run on one process that the 2-process runs and resumes are held to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    bilevel(out, 1, out.parent, backbone_dir)
    return out


def assert_same_run(one, two, tol=1e-5):
    """Two runs' final weights agree to `tol` relative, and their PRMs' parameters as a whole."""
    import torch
    from safetensors.torch import load_file
    w1, w2 = (json.load(open(o / "domain_weights.json"))["final"] for o in (one, two))
    assert w1.keys() == w2.keys() and all(abs(w1[d] - w2[d]) <= tol * abs(w1[d]) for d in w1), (w1, w2)
    a, b = (load_file(str(o / "prm" / "model.safetensors")) for o in (one, two))
    assert a.keys() == b.keys()
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt() / sum((a[k] ** 2).sum() for k in a).sqrt()
    assert diff <= tol, diff
    h1, h2 = (load_file(str(o / "prm" / "prm.safetensors"))["head.weight"] for o in (one, two))
    assert torch.allclose(h1, h2, rtol=tol, atol=1e-7)


@pytest.mark.parametrize("weighting", ["domain", "instance-table", "shared-prefix"])
def test_two_processes_train_as_one(weighting, straight, tmp_path, backbone_dir):
    """(a, c) torchrun bilevel_train.py on 2 processes (the PRM sharded with FSDP2, each process a
    share of every global batch) equals one process on the same global batches: the weights and the
    PRM after 3 outer iterations agree to 1e-5 relative (the parameters as a whole: Adam's first
    steps amplify float noise in tensors whose gradient is ~0). Process 0 alone writes: one metrics
    row per logged iteration, one PRM directory that loads and scores. The domain run on 2 splits
    each process's share in 2 micro-batches and recomputes activations (--grad-accum 2
    --grad-checkpointing), and the instance-table run on 2 keeps its restore copy in CPU memory
    (--offload-restore: each process its shards), which change nothing but memory. Shared-prefix
    training (--group-by-question) on 2 equals it on 1, and both score a held-out split every
    iteration (--eval): the same figures in one eval.jsonl."""
    from test_formats import labels_row, write_jsonl
    held = write_jsonl(tmp_path / "held.jsonl", [labels_row(q, f"Held {q}?", sample=s, correct=s == int(q))
                                                 for q in "01" for s in range(2)])
    flags = {"domain": [], "instance-table": ["--weighting", "instance-table"],
             "shared-prefix": ["--group-by-question", "--eval", held, "--eval-every", "1"]}[weighting]
    one, two = (straight if weighting == "domain" else tmp_path / "one"), tmp_path / "two"
    if weighting != "domain":
        bilevel(one, 1, tmp_path, backbone_dir, *flags)
    bilevel(two, 2, tmp_path, backbone_dir, *flags,
            *{"domain": ["--grad-accum", "2", "--grad-checkpointing"], "instance-table": ["--offload-restore"]}.get(weighting, []))
    assert_same_run(one, two)
    if weighting == "shared-prefix":
        e1, e2 = ([json.loads(x) for x in open(o / "eval.jsonl")] for o in (one, two))
        assert [e["iteration"] for e in e2] == [1, 2, 3] == [e["iteration"] for e in e1]
        assert all(e["eval/questions"] == 2 and e == pytest.approx(f, rel=1e-5) for e, f in zip(e2, e1)), (e1, e2)
    rows = [json.loads(x) for x in open(two / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [json.loads(x)["iteration"] for x in open(one / "metrics.jsonl")]
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    model = prm.PRM.from_pretrained(str(two))
    assert model.head.in_features > 0


def test_a_run_resumes_on_another_number_of_processes(straight, tmp_path, backbone_dir):
    """(d) A checkpoint holds whole tensors: a run stopped after 2 iterations on 2 processes and
    resumed on 1, and one stopped on 1 and resumed on 2, each equal the straight run on 1."""
    for first, then in ((2, 1), (1, 2)):
        moved = tmp_path / f"moved-{first}-{then}"
        bilevel(moved, first, tmp_path, backbone_dir, "--iterations", "2")           # the last --iterations counts
        bilevel(moved, then, tmp_path, backbone_dir, "--resume")
        assert_same_run(straight, moved)


def test_compact_states_on_two_processes(straight, tmp_path, backbone_dir):
    """--compact-states under torchrun: each process keeps its shards of the bf16 moments and rounds
    them with noise of its own, so the run is not bit for bit one process's fp32 AdamW run, but the
    PRM's total update agrees with it to 1% (the rounding noise moves it by about 0.2% here, as on one
    process; moments that were not kept would move it by far more)."""
    import torch
    bilevel(tmp_path / "compact", 2, tmp_path, backbone_dir, "--compact-states")
    runs = {n: dict(prm.PRM.from_pretrained(str(o)).named_parameters()) for n, o in ((1, straight),
                                                                                    (2, tmp_path / "compact"))}
    start = dict(prm.PRM.from_backbone(backbone_dir, seed=0).named_parameters())
    delta = {n: torch.cat([(runs[n][k] - start[k]).detach().flatten() for k in start]) for n in runs}
    assert delta[1].norm() > 0 and ((delta[2] - delta[1]).norm() / delta[1].norm()).item() <= 0.01


def test_a_batch_too_small_to_share_is_one_line(tmp_path, backbone_dir):
    """Under torchrun, a batch smaller than the processes stops in one line from process 0, nothing
    written."""
    out = tmp_path / "run"
    done = run(["bilevel_train.py", "--synthetic", "--model", backbone_dir, "--train-batch", "1", "--out", str(out)],
               2, tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]     # error (process 1): too
    assert len(errors) == 1 and "2 processes need --train-batch of at least 2" in errors[0], done.stderr[-2000:]
    assert not out.exists()


def test_a_killed_process_ends_the_run_with_one_line_and_it_resumes(tmp_path, backbone_dir):
    """(d) SIGKILL one of 2 processes mid-run: both are gone within 60 s, process 0 says in one line
    what happened and how to go on, and --resume (here on 1 process) finishes the run."""
    import signal
    import time
    out = tmp_path / "run"
    args = ["bilevel_train.py", "--synthetic", "--model", backbone_dir, "--iterations", "400", "--unroll-steps", "1",
            "--train-batch", "4", "--meta-batch", "4", "--save-every", "1", "--log-every", "1", "--no-baseline",
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
                            + args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [p for p in workers if b"RANK=1\x00" in open(f"/proc/{p}/environ", "rb").read()]
    assert len(rank1) == 1, workers
    os.kill(int(rank1[0]), signal.SIGKILL)
    killed = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - killed < 60 and proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("error")]     # error (process 1): too
    assert len(lines) == 1 and "rerun the same command with --resume" in lines[0], err[-4000:]
    at = json.loads((out / "checkpoint" / "state.json").read_text())["iteration"]
    done = run(args[:-2] + ["--iterations", str(at + 1), "--resume", "--out", str(out)], 1, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["iteration"] == at + 1


HYPERGRADIENT = """
import contextlib, json, sys
import torch
sys.path.insert(0, {root!r})
import bilevel_train as bt
import prm
rank, world = prm.processes()
if world > 1:
    torch.distributed.init_process_group("gloo")
train, meta = bt.synthetic_data(0, 8, 8)
records, m_records = train[::3][:8], meta[:6]
keys = torch.tensor([["clean", "noisy", "random"].index(r["domain"]) for r in records])
found = {{}}
for copy, shared in {cases!r}:             # the restore copy; shared-prefix forwards (--group-by-question)
    torch.manual_seed(0)
    model = prm.PRM.from_backbone({backbone!r}).double().train()
    if world > 1:
        bt.shard_prm(model, torch.device("cpu"), world, keep_gathered=shared)
    fwd = (bt.SharedPrefixForward if shared else bt.PackedForward)(model, contextlib.nullcontext())
    if world > 1:
        fwd = bt.ShardedForward(fwd, rank, world)
    a = [torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)]
    upper = bt.Upper(fwd, [p for p in model.parameters() if p.requires_grad], bt.DomainWeighting(a, keys), None,
                     1e-4, getattr(bt, copy), bt.meta_loss)
    mine = [m_records[i] for i in fwd.share(len(m_records), 1)[0].tolist()]
    L_meta = bt.meta_loss(*fwd(mine), mine) * (len(mine) / len(m_records))
    before = [bt.whole(p).clone() for p in upper.phi]
    g = bt.hypergradient(upper, L_meta, bt.train_batch(records, keys, "cpu"), 1e-3)
    assert all(torch.equal(bt.whole(p), b) for p, b in zip(upper.phi, before))     # restored bit for bit
    found[f"{{copy}} {{shared}}"] = g[0].tolist()
if rank == 0:
    json.dump(found, open({out!r}, "w"))
prm.leave_processes()
"""


def test_one_hypergradient_on_two_processes_is_one_processs(tmp_path, backbone_dir):
    """(b) The finite-difference hypergradient of DreamPRM's weights on 2 processes (fp64, the PRM
    sharded) equals one process's to 1e-5 relative (which tests/test_bilevel.py checks against
    autograd's double backward): packed with the restore copy in CPU memory (--offload-restore: each
    process keeps its shards), and shared-prefix (the CoTs share one prompt, whose KV cache carries
    gradients back into the layers after their own backward). phi is the same bits after it."""
    import torch
    g = {}
    for n, cases in ((1, [("device_copy", False)]), (2, [("CpuCopy", False), ("device_copy", True)])):
        script = tmp_path / f"hyper{n}.py"
        script.write_text(HYPERGRADIENT.format(root=ROOT, backbone=backbone_dir, cases=cases,
                                               out=str(tmp_path / f"g{n}.json")))
        done = run([str(script)], n, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        g.update({(n, k): torch.tensor(v) for k, v in json.loads((tmp_path / f"g{n}.json").read_text()).items()})
    one = g[1, "device_copy False"]
    for key in ((2, "CpuCopy False"), (2, "device_copy True")):
        assert one.abs().max() > 0 and ((g[key] - one).norm() / one.norm()).item() <= 1e-5, (key, g)
