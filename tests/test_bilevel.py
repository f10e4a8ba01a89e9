"""bilevel_train.py: hypergradient against autograd, weighted loss, direction, resume, bad input."""
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
import zlib
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import bilevel_train as bt
import prm
from conftest import stop_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ["clean", "noisy", "random"]

def forward(model, autocast, shared=False):
    """The run's forward seam: packed, or shared-prefix (--group-by-question)."""
    return (bt.SharedPrefixForward if shared else bt.PackedForward)(model, autocast)


def lower_step(model, opt, weighting, records, autocast, clip=0.0, shared=False, accum=1):
    """One lower step on all the weighting's CoTs (records, keyed by weighting.keys), through the method's seams."""
    batch = bt.train_batch(records, weighting.keys, "cpu")
    return bt.lower_step(forward(model, autocast, shared), opt, weighting, batch, accum, clip or math.inf)


def upper_step(model, phi, a, opt_a, batch, m_records, xi, autocast, offload=False, shared=False):
    """One upper step with DreamPRM's domain weights on raw weights a, through the method's seams."""
    upper = bt.Upper(forward(model, autocast, shared), phi, bt.DomainWeighting(a, batch.keys), opt_a, 0.01,
                     bt.CpuCopy if offload else bt.device_copy, bt.meta_loss)
    return bt.upper_step(upper, batch, m_records, xi)



@pytest.mark.parametrize("mode,family", [("domain", "qwen2_vl"), ("instance-table", "qwen2_vl"),
                                         ("instance-net", "qwen2_vl"), ("domain-instance", "qwen2_vl"),
                                         ("domain", "gemma3")])
def test_hypergradient_matches_double_backward(family_dir, mode, family):
    """The finite difference g_a against -xi d/da [grad_phi L_tr(phi, a) . v] by double backward,
    for domain weights, the Instance Table and the Instance Net's parameters, on Qwen2-VL; and for
    domain weights on another family (Gemma 3: other attention masks, other positions)."""
    torch.manual_seed(0)
    train, meta = bt.synthetic_data(0, 8, 8)
    model = prm.PRM.from_backbone(family_dir(family), attn_implementation="eager").double()
    phi = list(model.parameters())
    records, m_records = train[::3][:8], meta[:6]
    domain_keys = torch.tensor([DOMAINS.index(r["domain"]) for r in records])
    keys = {"domain": domain_keys, "domain-instance": torch.stack([torch.arange(8), domain_keys], 1)}.get(
        mode, torch.arange(8))
    enc, m_enc = [model.encode(r) for r in records], [model.encode(r) for r in m_records]
    batch = bt.train_batch(records, keys, "cpu")
    p, p_mask, N = batch.p.double(), batch.p_mask, batch.n.sum()
    if mode == "domain":
        a = [torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)]
    elif mode == "instance-table":
        a = [torch.linspace(-0.5, 0.5, 8, dtype=torch.float64).requires_grad_()]
    elif mode == "domain-instance":
        a = [torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True),
             torch.linspace(-0.5, 0.5, 8, dtype=torch.float64).requires_grad_()]
    else:
        a = [x.detach().double().normal_(0, 0.5, generator=torch.Generator().manual_seed(i)).requires_grad_()
             for i, x in enumerate(bt.init_instance_net(6, 0, "cpu"))]
    with torch.no_grad():
        V, M = prm.step_values(model, enc)                 # the net reads the values at phi (data)
    xi = 1e-3

    def meta_loss_fn():
        return bt.meta_loss(*prm.step_values(model, m_enc), m_records)

    def train_losses_fn():
        return bt.step_losses(*prm.step_values(model, enc), p, p_mask)[0]

    args = SimpleNamespace(weighting=mode, instance_batch=8, seed=0, weight_max=3.0, net_hidden=6, train_batch=8)
    fwd = bt.PackedForward(model, contextlib.nullcontext())
    weighting = bt.make_weighting(args, records, DOMAINS, "cpu", fwd)            # the run's, for this mode
    assert torch.equal(weighting.keys, keys) and [x.shape for x in weighting.a] == [x.shape for x in a]
    weighting.a = a
    valued = bt.ValuedBatch(records, keys, p, p_mask, batch.n, values=V, mask=M)

    def weights_fn(a_):
        return weighting.weights(a_, valued) / N

    before = [x.detach().clone() for x in phi]
    upper = bt.Upper(fwd, phi, weighting, None, 1e-4, bt.device_copy, bt.meta_loss)
    g = bt.hypergradient(upper, meta_loss_fn(), batch, xi)
    assert all(torch.equal(x, y) for x, y in zip(before, phi)), "phi must be restored bit for bit"

    def grads(loss, create_graph=False):
        gs = torch.autograd.grad(loss, phi, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(x) if gi is None else gi for x, gi in zip(phi, gs)]

    v = [gi.detach() for gi in grads(meta_loss_fn())]
    L_tr = (weights_fn(a) * train_losses_fn()).sum()
    dot = sum((gi * vi).sum() for gi, vi in zip(grads(L_tr, create_graph=True), v))
    g_ref = [-xi * x for x in torch.autograd.grad(dot, a)]
    flat, flat_ref = torch.cat([x.flatten() for x in g]), torch.cat([x.flatten() for x in g_ref])
    rel = ((flat - flat_ref).norm() / flat_ref.norm()).item()
    print(f"{mode}: hypergradient relative error {rel:.2e}")
    assert rel <= 1e-4
    assert flat_ref.norm() > 0 and (mode == "instance-net" or flat_ref.abs().min() > 0)


def test_lower_loss_is_the_weighted_mean():
    values = torch.tensor([[0.9, 0.2, 0.6], [0.7, 0.3, 0.5], [0.1, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    p = torch.tensor([[1.0, 0.0, 0.5], [1.0, 0.25, 0.0], [0.0, 0.0, 0.0]])
    p_mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)   # one unlabelled step
    a = torch.tensor([0.5, -1.0, 2.0])                  # three domains; domain 2 absent from the batch
    keys = torch.tensor([0, 1, 0])
    alpha = bt.domain_weights(a)
    assert torch.allclose(alpha.mean(), torch.tensor(1.0)) and (alpha > 0).all()
    l, n = bt.step_losses(values, mask, p, p_mask)
    L = bt.lower_loss(bt.domain_weights(a)[keys], l, n.sum())
    sq = [(0.9 - 1) ** 2 + 0.2 ** 2, (0.7 - 1) ** 2 + (0.3 - 0.25) ** 2, 0.1 ** 2]
    w = [alpha[0], alpha[1], alpha[0]]
    by_hand = sum(wi * s for wi, s in zip(w, sq)) / 5
    assert torch.allclose(L, by_hand) and n.tolist() == [2, 2, 1]
    assert torch.allclose(bt.domain_weights(torch.zeros(4)), torch.ones(4))
    a.requires_grad_(True)
    L = bt.lower_loss(bt.domain_weights(a)[keys], l, n.sum())
    L.backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_domain_gets_the_largest_weight(backbone_dir, tmp_path, monkeypatch, seed):
    """Synthetic set: clean labels, flipped labels, random labels; the meta set is clean."""
    out = str(tmp_path / "run")
    assert bt.main(["--synthetic", "--model", backbone_dir, "--out", out, "--seed", str(seed), "--iterations", "60",
                    "--unroll-steps", "1", "--train-batch", "16", "--meta-batch", "32", "--meta-lr", "0.05",
                    "--log-every", "50", "--save-every", "1000"]) == 0
    alpha = json.load(open(f"{out}/domain_weights.json"))["final"]
    print(seed, alpha)
    assert max(alpha, key=alpha.get) == "clean"
    assert alpha["clean"] > 2 * max(alpha["noisy"], alpha["random"])       # 3.5x to 6.2x in seeds 0-4


def run_script(args, cwd, **kw):
    """bilevel_train.py in a subprocess on one CPU thread: multi-threaded CPU reductions were seen to
    differ between processes by ~5e-6 after a few steps, which would hide or fake a resume error."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "bilevel_train.py")] + args, cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def final_state(out):
    """The raw weights (a, or the Instance Net's theta) with their optimizer state, the value head,
    and every trainable tensor of the last checkpoint (backbone included)."""
    state = load_file(f"{out}/checkpoint/state.safetensors")
    head = load_file(f"{out}/prm/prm.safetensors")
    weights = load_file(f"{out}/checkpoint/model.safetensors")
    return [state[k] for k in sorted(state) if k.startswith(("a", "theta"))] + [head["head.weight"], head["head.bias"]] + \
        [weights[k] for k in sorted(weights)]


@pytest.mark.parametrize("mode", ["domain", "instance-table", "instance-net", "domain-instance"])
def test_each_weighting_resumes_where_it_stopped(backbone_dir, tmp_path, monkeypatch, mode):
    """What each weighting saves (a, the tables, theta, their optimizer states) brings a resumed run
    to the same bits as an uninterrupted one; the run is stopped between two checkpoints."""
    args = ["--synthetic", "--model", backbone_dir, "--iterations", "10", "--unroll-steps", "2", "--save-every", "4",
            "--log-every", "2", "--train-batch", "4", "--meta-batch", "4", "--weighting", mode, "--cold-start", "0"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert bt.main(args + ["--out", full]) == 0
    assert all(json.loads(line)["upper/loss"] is not None for line in open(f"{full}/metrics.jsonl"))  # the weights move
    stop_after(monkeypatch, 6, args + ["--out", cut])
    assert bt.main(args + ["--out", cut, "--resume"]) == 0
    full_state, cut_state = final_state(full), final_state(cut)
    assert len(full_state) == len(cut_state) > 10
    assert all(torch.equal(x, y) for x, y in zip(full_state, cut_state))
    iters = [json.loads(line)["iteration"] for line in open(f"{cut}/metrics.jsonl")]
    assert iters == list(range(2, 11, 2))                      # nothing missing, nothing twice


def test_resume_after_sigkill_matches_uninterrupted(backbone_dir, tmp_path):
    """A process killed at any moment (here mid-run, by SIGKILL) resumes to an uninterrupted run's state.
    Writing is one path for every weighting; what each weighting saves is checked in the test above."""
    args = ["--synthetic", "--model", backbone_dir, "--iterations", "30", "--unroll-steps", "2", "--save-every", "5",
            "--log-every", "5", "--train-batch", "4", "--meta-batch", "4", "--weighting", "domain"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                    # as run_script's process: one CPU thread
    try:
        assert bt.main(args + ["--out", full]) == 0             # the uninterrupted run, in this process
    finally:
        torch.set_num_threads(threads)
    proc = run_script(args + ["--out", cut], tmp_path)
    state = os.path.join(cut, "checkpoint", "state.json")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.load(open(state))["iteration"] >= 10:
                break
        except (FileNotFoundError, ValueError):     # not written yet, or between the two renames
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = run_script(args + ["--out", cut], tmp_path)         # a rerun without --resume stops
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "--resume" in err          # no silent overwrite of a run
    killed_at = json.load(open(state))["iteration"]
    assert 10 <= killed_at < 30
    proc = run_script(args + ["--out", cut, "--resume"], tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed {cut} at iteration {killed_at}" in out
    full_state, cut_state = final_state(full), final_state(cut)
    assert len(full_state) == len(cut_state) > 10
    for x, y in zip(full_state, cut_state):
        assert (x - y).abs().max().item() <= 1e-6
    iters = [json.loads(line)["iteration"] for line in open(f"{cut}/metrics.jsonl")]
    assert iters == list(range(5, 31, 5))                      # nothing missing, nothing twice


def write_labels(path, rows):
    with open(path, "w") as f:
        for i, (domain, mc, steps) in enumerate(rows):
            f.write(json.dumps({"id": f"q{i}", "domain": domain, "question": "Sum?", "image": None, "answer": "7",
                                "steps": [f"Step {k + 1}: x" for k in range(steps)], "final": "7", "pred": "7",
                                "correct": True, "mc": mc}) + "\n")
    return str(path)


@pytest.mark.parametrize("case", ["unknown_domain", "empty_domain", "meta_unusable", "nan_label"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    train = write_labels(tmp_path / "train.jsonl", [("ai2d", [1.0, 0.5], 2), ("m3cot", [], 0)])
    meta = write_labels(tmp_path / "meta.jsonl", [("meta", [1.0], 1)])
    args = ["--train", train, "--meta", meta, "--model", "tiny", "--out", str(tmp_path / "run")]
    if case == "unknown_domain":
        args += ["--domains", "ai2d,chartqa"]
        words = "unknown domain(s) chartqa; domains present: ai2d, m3cot"
    elif case == "empty_domain":
        args += ["--domains", "m3cot"]
        words = "domain 'm3cot' has no usable records"
    elif case == "meta_unusable":
        args[3] = write_labels(tmp_path / "meta0.jsonl", [("meta", [], 0)])
        words = "no usable meta records: 1 of 1 source records skipped (no steps: 1)"
    else:
        (tmp_path / "train.jsonl").write_text(
            (tmp_path / "train.jsonl").read_text().replace("[1.0, 0.5]", "[1.0, NaN]"))
        words = "train.jsonl:1: field 'mc': label nan is not a number in [0, 1]"
    code = bt.cli(args)
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "run")


def test_checkpoint_cut_between_renames_is_recovered(tmp_path):
    """A crash between atomic_dir's two renames leaves only checkpoint.old: it is brought back."""
    ck = tmp_path / "checkpoint"
    with prm.atomic_dir(str(ck)) as tmp:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            f.write('{"iteration": 5}')
    os.replace(ck, str(ck) + ".old")                        # the state right after the first rename
    assert not ck.exists()
    prm.recover_dir(str(ck))
    assert json.loads((ck / "state.json").read_text())["iteration"] == 5


def test_diverged_run_stops_and_keeps_checkpoint(backbone_dir, tmp_path, monkeypatch, capsys):
    """A NaN lower loss at the 4th lower step: the run stops, the checkpoint of step 3 stays."""
    monkeypatch.chdir(tmp_path)
    calls = []
    real = bt.lower_loss

    def lower_loss_nan_at_4(*args):
        calls.append(1)
        L = real(*args)
        return L * float("nan") if len(calls) == 4 else L

    monkeypatch.setattr(bt, "lower_loss", lower_loss_nan_at_4)
    out = str(tmp_path / "run")
    code = bt.cli(["--synthetic", "--model", backbone_dir, "--out", out, "--iterations", "10", "--unroll-steps", "1",
                   "--save-every", "1", "--train-batch", "4", "--meta-batch", "4"])
    err = capsys.readouterr().err
    assert code == 1 and "the lower loss L_tr is nan at iteration 4; stopped before the step: its checkpoint at " \
        "iteration 3 is kept: --resume continues from it with the same flags. To change --lr (now 0.0001), " \
        "--weight-decay (now 0) or --grad-clip (now 0), rerun with the new flags and --overwrite" in err, err
    assert json.load(open(f"{out}/checkpoint/state.json"))["iteration"] == 3
    assert not os.path.exists(f"{out}/prm")
    calls.clear()                                 # no checkpoint yet: said so; the command it gives works
    code = bt.cli(["--synthetic", "--model", backbone_dir, "--out", out, "--iterations", "10", "--unroll-steps", "1",
                   "--save-every", "5", "--train-batch", "4", "--meta-batch", "4", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 1 and "at iteration 4; stopped before the step: no checkpoint was written yet" in err, err
    monkeypatch.setattr(bt, "lower_loss", real)
    assert bt.cli(["--synthetic", "--model", backbone_dir, "--out", out, "--iterations", "2", "--unroll-steps", "1",
                   "--train-batch", "4", "--meta-batch", "4", "--lr", "5e-5", "--overwrite"]) == 0
    monkeypatch.setattr(bt, "hypergradient", lambda *a, **k: [torch.full((3,), float("nan"))])
    code = bt.cli(["--synthetic", "--model", backbone_dir, "--out", str(tmp_path / "up"), "--iterations", "2",
                   "--unroll-steps", "1", "--train-batch", "4", "--meta-batch", "4"])
    err = capsys.readouterr().err
    assert code == 1 and "the hypergradient holds non-finite values (L_meta 0." in err and "at iteration 1" in err and \
        "To change --meta-lr (now 0.05) or --fd-radius (now 0.01)" in err, err


def changed_fraction(model, before, grads):
    """Fraction of backbone weights with a non-zero gradient that changed in the step (embedding
    rows of tokens absent from the batch get no gradient, so no update, in any precision)."""
    changed = total = 0
    for p, b, g in zip(model.backbone.parameters(), before, grads):
        if g is not None:
            live = g != 0
            changed += (p.detach().float() != b.float())[live].sum().item()
            total += live.sum().item()
    return changed / total


def test_bf16_compute_keeps_updates_far_below_bf16_resolution(backbone_dir):
    """--precision bf16: bf16 autocast compute on fp32 master weights. An AdamW step of lr 5e-7
    (bf16's half-ulp at |w| = 0.02 is 7.8e-5) must still move >= 99% of the weights; plain bf16
    weights, as the published code keeps them, lose almost all of it."""
    train, _ = bt.synthetic_data(0, 8, 8)
    records = train[:8]
    keys = torch.tensor([DOMAINS.index(r["domain"]) for r in records])
    a = [torch.zeros(3)]
    fractions = {}
    for mode in ("master_fp32", "plain_bf16"):
        model = prm.PRM.from_backbone(backbone_dir).train()
        if mode == "plain_bf16":
            model.backbone.to(torch.bfloat16)
        before = [p.detach().clone() for p in model.backbone.parameters()]
        opt = torch.optim.AdamW(model.parameters(), lr=5e-7, weight_decay=0.0)
        grads, step = [], opt.step

        def recording_step():                          # lower_step frees the gradients after the step
            grads.extend(None if p.grad is None else p.grad.clone() for p in model.backbone.parameters())
            step()
        opt.step = recording_step
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        batch = lower_step(model, opt, bt.DomainWeighting(a, keys), records, autocast)
        assert torch.isfinite(batch.L_tr)
        fractions[mode] = changed_fraction(model, before, grads)
        if mode == "master_fp32":
            assert all(p.dtype == torch.float32 for p in model.parameters())
    print(fractions)
    assert fractions["master_fp32"] >= 0.99
    assert fractions["plain_bf16"] < 0.5


def test_gradient_checkpointing_gives_the_same_step(backbone_dir):
    train, _ = bt.synthetic_data(1, 8, 8)
    records = train[::6][:6]
    keys = torch.tensor([DOMAINS.index(r["domain"]) for r in records])
    a = [torch.tensor([0.2, -0.1, 0.0])]
    params = {}
    for ckpt in (False, True):
        model = prm.PRM.from_backbone(backbone_dir).train()
        if ckpt:
            bt.enable_checkpointing(model)
            assert model.backbone.language_model.gradient_checkpointing
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        lower_step(model, opt, bt.DomainWeighting(a, keys), records, torch.autocast("cpu", enabled=False))
        params[ckpt] = [p.detach().clone() for p in model.parameters()]
    assert max((x - y).abs().max().item() for x, y in zip(params[False], params[True])) <= 1e-6
    assert any((x != y0).any() for x, y0 in zip(params[False], prm.PRM.from_backbone(backbone_dir).parameters()))


@pytest.mark.parametrize("flags", [["--weighting", "instance"], ["--weighting", "domain-instance"], ["--no-aggregation"],
                                   ["--upper-loss", "bce"],
                                   ["--weighting", "fixed"], ["--compact-states"],
                                   ["--group-by-question", "--grad-checkpointing"]])
def test_modes_run_and_write_their_outputs(backbone_dir, tmp_path, flags):
    out = str(tmp_path / "run")
    assert bt.main(["--synthetic", "--model", backbone_dir, "--out", out, "--iterations", "4", "--unroll-steps", "2",
                    "--log-every", "2", "--train-batch", "4", "--meta-batch", "4", "--cold-start", "0"] + flags) == 0
    weights = json.load(open(f"{out}/domain_weights.json"))
    assert set(weights["final"]) == set(DOMAINS) and len(weights["history"]) == 2
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [2, 4] and all(f"alpha/{d}" in rows[0] for d in DOMAINS)
    assert (rows[0]["upper/loss"] is None) == (flags == ["--weighting", "fixed"])
    if flags[0] == "--weighting" and flags[1] == "fixed":
        assert all(w == 1.0 for w in weights["final"].values())
    else:
        assert any(abs(w - 1.0) > 1e-4 for w in weights["final"].values())     # the upper level moved a
    assert os.path.getsize(f"{out}/domain_weights.png") > 0
    prm.PRM.from_pretrained(out)


@pytest.mark.parametrize("mode", ["instance-table", "domain-instance"])
def test_an_upper_step_moves_instance_weights_the_right_way(backbone_dir, mode):
    """Two training CoTs of the same steps, one labelled right (every step 1) and one wrong (every
    step 0), and a meta CoT of those steps that is correct: one upper step raises the right CoT's
    table weight and lowers the wrong one's."""
    steps = ["We count the red circles: 3.", "We add the blue squares: 3 + 4 = 7."]
    train = [{"id": f"t{k}", "domain": "d", "question": "How many shapes?", "steps": steps, "final": "7",
              "mc": [label] * 2, "_image": None} for k, label in enumerate((1.0, 0.0))]
    meta = [{"id": "m", "domain": "meta", "question": "How many shapes?", "steps": steps, "final": "7",
             "correct": True, "_image": None}]
    torch.manual_seed(0)
    model = prm.PRM.from_backbone(backbone_dir).train()
    args = SimpleNamespace(weighting=mode, instance_batch=2, seed=0, weight_max=3.0, net_hidden=6, train_batch=2)
    weighting = bt.make_weighting(args, train, ["d"], "cpu", None)
    opt_a = torch.optim.Adam(weighting.a, lr=0.1)
    upper = bt.Upper(bt.PackedForward(model, torch.autocast("cpu", enabled=False)),
                     [p for p in model.parameters() if p.requires_grad], weighting, opt_a, 0.01, bt.device_copy,
                     bt.meta_loss)
    bt.upper_step(upper, bt.train_batch(train, weighting.keys, "cpu"), meta, 1e-3)
    table = weighting.a[-1].detach()                                       # (2,) the CoTs' raw table weights
    assert table[0] > 0 > table[1], table


def test_instance_weights_are_bounded():
    """Table and net weights lie in (0, w_max), start at 1, and keep a gradient at the bounds."""
    x = torch.tensor([-1e4, -10.0, 0.0, 10.0, 1e4], requires_grad=True)
    w = bt.bounded(x, 3.0)
    assert w[2].item() == pytest.approx(1.0) and (w >= 0).all() and (w <= 3.0).all()
    assert w[1].item() > 0 and w[3].item() < 3.0
    w.sum().backward()
    assert (x.grad[1:4] > 0).all()
    theta = bt.init_instance_net(8, 0, "cpu")
    mask = torch.ones(5, 4, dtype=torch.bool)
    batch = bt.ValuedBatch([None] * 5, torch.arange(5), torch.rand(5, 4), mask, mask.sum(-1).float(),
                           values=torch.rand(5, 4), mask=mask)
    assert torch.allclose(bt.InstanceNet(theta, None, 3.0, None, None, None, 8).weights(theta, batch), torch.ones(5))
    big = [t.detach() * 0 + 50 for t in theta]
    assert (bt.InstanceNet(big, None, 2.0, None, None, None, 8).bounded_weights(big, batch) <= 2.0).all()
    # The weights a batch trains with have mean 1: only the relative weights count.
    a = [torch.tensor([-2.0, 0.0, 1.0, 3.0])]
    w = bt.InstanceTable(a, torch.arange(4), 3.0, None).weights(a, SimpleNamespace(keys=torch.tensor([0, 1, 2, 3])))
    assert w.mean().item() == pytest.approx(1.0) and w[0] < w[1] < w[2] < w[3]


def test_auc_by_hand():
    assert bt.auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert bt.auc([0.5, 0.5], [True, False]) == 0.5                 # a tie counts one half
    assert bt.auc([0.1, 0.9, 0.5], [True, False, False]) == 0.0
    assert bt.auc([0.3, 0.7, 0.5, 0.5], [True, True, False, False]) == 0.5
    assert bt.auc([1.0], [True]) is None
    train = [{"domain": d, "toy": {"key_corrupted": c}} for d, c in
             [("noisy", True), ("noisy", False), ("clean", False), ("irrelevant", True), ("irrelevant", False)]]
    out = bt.key_auc([0.2, 0.9, 1.0, 0.5, 0.4], train)
    assert out == {"overall": 5 / 6, "noisy": 1.0, "irrelevant": 0.0}


def test_memory_options_are_exact(backbone_dir):
    """Gradients are freed after each lower step, and the restore copy kept in CPU memory gives
    the same hypergradient and the same phi bit for bit; --freeze-vision leaves the vision tower as
    it was and trains the rest."""
    train, meta = bt.synthetic_data(0, 8, 8)
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = prm.PRM.from_backbone(backbone_dir)
        phi = [p for p in model.parameters() if p.requires_grad]
        a = [torch.zeros(3, requires_grad=True)]
        opt = torch.optim.AdamW(phi, lr=1e-3)
        opt_a = torch.optim.Adam(a, lr=0.05)
        keys = torch.tensor([DOMAINS.index(r["domain"]) for r in train[::3][:8]])
        off = torch.autocast("cpu", enabled=False)
        batch = lower_step(model, opt, bt.DomainWeighting(a, keys), train[::3][:8], off)
        assert all(p.grad is None for p in phi)                       # freed before the hypergradient
        upper_step(model, phi, a, opt_a, batch, meta[:6], 1e-3, off, offload=offload)
        results.append([a[0].detach().clone()] + [p.detach().clone() for p in phi])
    assert all(torch.equal(x, y) for x, y in zip(*results))
    model = prm.PRM.from_backbone(backbone_dir)
    vision = {k: v.clone() for k, v in model.backbone.visual.state_dict().items()}
    text = {k: v.clone() for k, v in model.backbone.language_model.state_dict().items()}
    bt.freeze_vision(model)
    phi = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(phi, lr=1e-2)
    records = [dict(r, _image=None) for r in train[:4]]
    lower_step(model, opt, bt.DomainWeighting([torch.zeros(3)], torch.zeros(4, dtype=torch.long)), records,
               torch.autocast("cpu", enabled=False))
    assert all(torch.equal(v, model.backbone.visual.state_dict()[k]) for k, v in vision.items())
    assert not all(torch.equal(v, model.backbone.language_model.state_dict()[k]) for k, v in text.items())


def assert_optimizer_resumes_exactly(backbone_dir, tmp_path, make_optimizer):
    """2 lower steps, a checkpoint, 1 more step; against a fresh model and optimizer loaded from
    the checkpoint and stepped once: the same phi bit for bit."""
    train, _ = bt.synthetic_data(2, 8, 8)
    records = train[::4][:6]
    keys = torch.tensor([DOMAINS.index(r["domain"]) for r in records])
    a = [torch.tensor([0.2, -0.1, 0.0])]
    off = torch.autocast("cpu", enabled=False)
    runs = []
    for resumed in (False, True):
        model = prm.PRM.from_backbone(backbone_dir).train()
        phi = [p for p in model.parameters() if p.requires_grad]
        opt, opt_a = make_optimizer(phi), torch.optim.Adam([a[0].clone().requires_grad_()])
        if resumed:
            bt.load_checkpoint(str(tmp_path), model, [torch.zeros(3)], opt, opt_a)
        else:
            for _ in range(2):
                lower_step(model, opt, bt.DomainWeighting(a, keys), records, off)
            bt.save_checkpoint(str(tmp_path), model, [torch.zeros(3)], opt, opt_a, 2, prm.output_lock(str(tmp_path / "run")).hold())
        lower_step(model, opt, bt.DomainWeighting(a, keys), records, off)
        runs.append([p.detach().clone() for p in phi])
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def test_fused_adamw_matches_the_per_tensor_loop_and_resumes(backbone_dir, tmp_path):
    """The lower optimizer is fused AdamW by default, on the CPU as on CUDA (no 4-byte-per-parameter
    temporary, one kernel a step). Its result is compared with torch's per-tensor loop: 5 lower steps at lr 1e-3
    differ by at most 1e-6 per weight (the order of float operations differs; a wrong moment or
    bias correction would differ by ~1e-3). A checkpoint of the fused optimizer resumes exactly."""
    train, _ = bt.synthetic_data(2, 8, 8)
    records = train[::4][:6]
    keys = torch.tensor([DOMAINS.index(r["domain"]) for r in records])
    a = [torch.tensor([0.2, -0.1, 0.0])]
    off = torch.autocast("cpu", enabled=False)
    params = {}
    for fused in (False, True):
        model = prm.PRM.from_backbone(backbone_dir).train()
        phi = [p for p in model.parameters() if p.requires_grad]
        opt = bt.lower_optimizer(phi, 1e-3, 0.01, False, 0, fused=fused)
        assert bool(opt.defaults["fused"]) == fused and not opt.defaults["foreach"]
        assert bt.lower_optimizer(phi, 1e-3, 0.01, False, 0).defaults["fused"]          # the default, here on CPU
        for _ in range(5):
            lower_step(model, opt, bt.DomainWeighting(a, keys), records, off)
        params[fused] = [p.detach().clone() for p in phi]
    assert max((x - y).abs().max().item() for x, y in zip(params[False], params[True])) <= 1e-6
    assert_optimizer_resumes_exactly(backbone_dir, tmp_path, lambda phi: bt.lower_optimizer(phi, 1e-3, 0.0, False, 0, fused=True))


def test_allocation_counter_sees_the_foreach_temporary():
    """tests/bench.py measures CPU peaks from the profiler's allocation events. Checked here on an
    AdamW step of 10 x 300k parameters: foreach holds sqrt(v) of all of them at once (4 bytes per
    parameter on top of gradients and moments), the per-tensor loop a few tensors' worth, fused none."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import bench
    peaks = {}
    for kind in ("foreach", "loop", "fused"):
        ps = [torch.zeros(300, 1000, requires_grad=True) for _ in range(10)]
        for p in ps:
            p.grad = torch.ones_like(p)
        opt = torch.optim.AdamW(ps, lr=1e-3, foreach=kind == "foreach", fused=(kind == "fused") or None)
        opt.step()                                               # the moments now exist
        peaks[kind] = bench.cpu_peak(opt.step)[1] / 3e6          # bytes per parameter above what was held
    assert peaks["foreach"] == pytest.approx(4.0, abs=0.01)
    assert peaks["loop"] < 1.5                                   # sqrt, division and the last denominator
    assert peaks["fused"] < 0.01


def test_2b_memory_budget_is_measured_from_the_real_modules():
    """tests/bench.py --budget: Qwen2-VL-2B built on the meta device (no RAM for its weights). The
    measured AdamW states are 8 bytes per trainable parameter, torch's foreach step allocates 4
    more, and the peak of each option is the larger of the lower step and the hypergradient."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import bench
    table = {row["option"]: row for row in bench.memory_budget()}
    every = table["torch defaults: foreach AdamW, grads kept"]["trainable"]
    assert 2.20e9 < every < 2.22e9                                # Qwen2-VL-2B + the value head
    frozen = table["--freeze-vision"]["trainable"]
    assert 0.66e9 < every - frozen < 0.67e9                       # the vision tower
    for name, row in table.items():
        n = row["trainable"]
        compact = name in ("--compact-states (not exact)", "both")
        assert row["weights"] == 4 * every and row["adamw"] == (4 if compact else 8) * n and row["v"] == 4 * n
        if compact:
            assert 0 < row["step"] < 2 ** 28                        # chunk temporaries: under 0.25 GiB
        else:                                                        # foreach: sqrt(v_hat) of all of phi; fused: none
            assert row["step"] == (0 if "fused" in name or "freeze" in name else 4 * n), name
        assert row["peak"] == max(row["lower"], row["hyper"])
    per_parameter = {k: row["peak"] / every for k, row in table.items()}
    assert per_parameter["torch defaults: foreach AdamW, grads kept"] == 24   # w, g, m, s, v, restore
    assert per_parameter["grads freed after each lower step"] == 20            # w, m, s + v, restore or g, temp
    assert per_parameter["--offload-restore"] == 20                            # the foreach step is the peak
    assert table["--offload-restore"]["lower"] > table["--offload-restore"]["hyper"]
    assert per_parameter["fused AdamW"] == 16
    assert table["fused AdamW"]["peak"] / 2 ** 30 < 33
    assert table["both"]["peak"] / 2 ** 30 < 21


def test_bench_memory_options_run(capsys):
    """The per-option section of tests/bench.py (what a GPU run prints for the 2B model) runs every
    option on the tiny backbone on CPU and measures a peak and a time for each."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import bench
    bench.main(["--only", "options", "--U", "1", "--iterations", "1", "--batch", "2", "--steps", "2"])
    lines = capsys.readouterr().out.splitlines()
    for name, _ in bench.OPTIONS:
        row = next(line for line in lines if line.startswith("    " + name + " "))
        peak, t_bilevel, t_plain = (float(x) for x in row[len(name) + 4:].split()[:3])
        assert peak > 0 and t_bilevel > 0 and t_plain > 0


def test_stochastic_rounding_is_unbiased_and_keeps_small_increments():
    """bf16 moments need stochastic rounding: an Adam second moment s <- 0.999 s + 0.001 g^2 with
    g = 1 from s = 0 should follow 1 - 0.999^t; rounded to nearest bf16 it stops moving once the
    increment is below half a spacing, stochastically rounded it tracks the exact value."""
    gen = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2 ** -9)                      # a quarter of the way between bf16 values
    rounded = bt.stochastic_round_bf16(x, gen).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert rounded.mean().item() == pytest.approx(x[0].item(), abs=2e-5)   # 4 standard errors: 1.5e-5
    nearest = torch.zeros(1000, dtype=torch.bfloat16)
    stochastic = torch.zeros(1000, dtype=torch.bfloat16)
    for _ in range(3000):
        nearest = (nearest.float() * 0.999 + 0.001).to(torch.bfloat16)
        stochastic = bt.stochastic_round_bf16(stochastic.float() * 0.999 + 0.001, gen)
    exact = 1 - 0.999 ** 3000                                       # 0.950
    assert nearest.float().mean().item() < 0.6                      # stuck far below
    assert stochastic.float().mean().item() == pytest.approx(exact, abs=0.01)


def test_compact_adamw_stays_within_its_bound_and_resumes(backbone_dir, tmp_path):
    """--compact-states against torch's AdamW on the same 20 lower steps: bf16 moments with
    stochastic rounding move phi by the same amount within 3% (||phi_c - phi|| / ||phi - phi_0||);
    the moments take 2 bytes per parameter each; a checkpoint resumes bit for bit."""
    train, _ = bt.synthetic_data(3, 8, 8)
    records = train[::4][:6]
    keys = torch.tensor([DOMAINS.index(r["domain"]) for r in records])
    a = [torch.tensor([0.2, -0.1, 0.0])]
    off = torch.autocast("cpu", enabled=False)
    start = [p.detach().clone() for p in prm.PRM.from_backbone(backbone_dir).parameters()]
    params = {}
    for compact in (False, True):
        model = prm.PRM.from_backbone(backbone_dir).train()
        phi = list(model.parameters())
        opt = bt.lower_optimizer(phi, 1e-3, 0.01, compact, 0)
        for _ in range(20):
            lower_step(model, opt, bt.DomainWeighting(a, keys), records, off)
        params[compact] = [p.detach().clone() for p in phi]
        if compact:
            assert all(st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16 for st in opt.state.values())
    norm = lambda xs: torch.sqrt(sum((x ** 2).sum() for x in xs)).item()    # noqa: E731
    moved = norm([x - x0 for x, x0 in zip(params[False], start)])
    off_by = norm([x - y for x, y in zip(params[True], params[False])])
    print(f"moved {moved:.4f}, compact off by {off_by:.5f} ({off_by / moved:.2%})")
    assert moved > 0.1 and off_by / moved < 0.03
    assert_optimizer_resumes_exactly(backbone_dir, tmp_path,
                                     lambda phi: bt.lower_optimizer(phi, 1e-3, 0.0, True, 5))


def test_lr_schedules_by_hand():
    def f(t, total, schedule, warmup, lr_step, lr_gamma):
        """xi / lr at lower step t of `total` (U = 1)."""
        return bt.get_xi(t, SimpleNamespace(lr=1.0, iterations=total, unroll_steps=1, lr_schedule=schedule,
                                            warmup=warmup, lr_step=lr_step, lr_gamma=lr_gamma))
    assert [f(t, 10, "constant", 0.0, 5, 0.5) for t in (0, 9)] == [1.0, 1.0]
    assert [f(t, 10, "constant", 0.2, 5, 0.5) for t in (0, 1, 2)] == [0.5, 1.0, 1.0]          # 2 warm-up steps
    assert f(0, 11, "cosine", 0.0, 5, 0.5) == 1.0
    assert abs(f(5, 11, "cosine", 0.0, 5, 0.5) - 0.5 * (1 + math.cos(math.pi * 5 / 11))) < 1e-12
    assert [f(t, 100, "step", 0.0, 10, 0.5) for t in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    args = bt.parse_args(["--synthetic", "--recipe", "dreamprm-1.5", "--warmup", "0.1"])
    assert (args.lr_schedule, args.warmup, args.grad_clip) == ("cosine", 0.1, 1.0)        # a flag beats the recipe
    args = bt.parse_args(["--synthetic", "--recipe", "dreamprm"])
    assert (args.lr_schedule, args.lr_step, args.lr_gamma, args.meta_weight_decay) == ("step", 5000, 0.5, 1e-3)
    assert bt.parse_args(["--synthetic"]).lr_schedule == "constant"


def test_presets_fill_unset_flags_first_preset_winning_and_help_lists_them(capsys):
    real = ["--train", "t.jsonl", "--meta", "m.jsonl"]
    got = lambda argv, *names: tuple(getattr(bt.parse_args(argv), n) for n in names)
    assert got([], "iterations", "train_batch", "meta_batch", "lr", "meta_lr") == (150, 16, 32, 1e-4, 0.05)   # toy
    assert got(real + ["--model", "/m"], "iterations", "lr", "meta_lr", "unroll_steps") == (1000, 5e-7, 0.01, 5)
    assert got(real, "lr") == (1e-4,)                                                           # --model tiny
    # the instance mode's meta lr beats the toy's; the toy instance modes' iterations beat the toy's
    assert got(["--weighting", "instance-net"], "meta_lr", "unroll_steps", "iterations", "cold_start",
               "log_every") == (0.01, 1, 750, 100, 50)
    assert got(real + ["--weighting", "instance"], "weighting", "meta_lr", "iterations", "cold_start") == \
        ("instance-table", 0.1, 1000, 0)
    assert got(["--weighting", "instance-net", "--meta-lr", "0.2", "--cold-start", "0"], "meta_lr", "cold_start") == \
        (0.2, 0)                                                                                # a flag beats them all
    with pytest.raises(SystemExit):
        bt.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1000; toy 150; toy instance modes 750)" in text
    assert "(default: 0.0; --recipe dreamprm 0.001)" in text
    flags = [f.name for o in bt.OPTIONS for f in dataclasses.fields(o)]
    assert len(flags) == len(set(flags)) and all("--" + f.replace("_", "-") in text for f in flags)


def test_gradient_clipping_bounds_the_step(backbone_dir):
    train, _ = bt.synthetic_data(0, 8, 8)
    records = train[:8]
    keys = torch.tensor([DOMAINS.index(r["domain"]) for r in records])
    norms = {}
    for clip in (0.0, 1e-3):
        model = prm.PRM.from_backbone(backbone_dir).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step = opt.step

        def recording_step():
            norms[clip] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                                if p.grad is not None])).item()
            step()
        opt.step = recording_step
        lower_step(model, opt, bt.DomainWeighting([torch.zeros(3)], keys), records, torch.autocast("cpu", enabled=False),
                      clip=clip)
    assert norms[0.0] > 1e-3 and abs(norms[1e-3] - 1e-3) < 1e-6


def test_schedules_run_resume_and_vanilla_needs_no_meta(tmp_path):
    from test_formats import labels_row, write_jsonl
    out = str(tmp_path / "run")
    base = ["--synthetic", "--out", out, "--iterations", "4", "--unroll-steps", "1", "--save-every", "2",
            "--recipe", "dreamprm-1.5", "--train-batch", "4", "--meta-batch", "4"]
    assert bt.main(base) == 0
    config = json.load(open(f"{out}/config.json"))
    assert (config["lr_schedule"], config["warmup"], config["grad_clip"]) == ("cosine", 0.05, 1.0)
    assert bt.cli(base[:-6] + ["--resume", "--iterations", "5", "--recipe", "dreamprm", "--train-batch", "4",
                               "--meta-batch", "4"]) == 2                 # another schedule: refused on resume
    train = write_jsonl(tmp_path / "train.jsonl", [labels_row("t1", "Q one?"), labels_row("t2", "Q two?", correct=False)])
    assert bt.main(["--train", train, "--weighting", "fixed", "--out", str(tmp_path / "vanilla"), "--iterations", "1",
                    "--unroll-steps", "1", "--train-batch", "2"]) == 0
    assert os.path.isfile(tmp_path / "vanilla" / "prm" / "prm.safetensors")


def grouped_records(images, with_images=True):
    """Three questions with 3, 2 and 1 CoTs (two with images), steps of different lengths, labels."""
    from test_prm import make_steps
    records = []
    for q, n in enumerate([3, 2, 1]):
        for s in range(n):
            steps = make_steps(1 + (q + s) % 4, s)
            records.append({"id": f"q{q}", "domain": DOMAINS[q], "question": f"Question {q}?",
                            "_question": f"Question {q}?", "_image": images[q] if with_images and q < 2 else None,
                            "steps": steps, "final": str(s), "correct": s % 2 == 0,
                            "mc": [float((s + i) % 2) for i in range(len(steps))]})
    return [records[i] for i in (0, 3, 1, 5, 4, 2)]                     # questions interleaved


@pytest.mark.parametrize("backbone,with_images,checkpointing", [("vl", True, False), ("vl", True, True),
                                                                ("vl", False, False), ("text", False, False),
                                                                ("text", False, True)])
def test_shared_prefix_training_equals_packed(request, images, backbone, with_images, checkpointing):
    """The lower loss and every parameter's gradient, shared-prefix against packed, to 1e-5; and the
    hypergradient through both, to 1e-5. checkpointing: the shared-prefix side recomputes each layer
    in backward (--grad-checkpointing), its prefix cache kept and read again."""
    path = request.getfixturevalue("backbone_dir" if backbone == "vl" else "text_lm_dir")
    records = grouped_records(images, with_images)
    keys = torch.tensor([DOMAINS.index(r["domain"]) for r in records])
    off = torch.autocast("cpu", enabled=False)
    grads, losses, hyper = {}, {}, {}
    for shared in (False, True):
        torch.manual_seed(0)
        model = prm.PRM.from_backbone(path).train()
        if shared and checkpointing:
            bt.enable_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.backbone.modules())
        values, mask = forward(model, off, shared)(records)
        p, p_mask = bt.label_tensors(records, values.shape[1], "cpu")
        l, n = bt.step_losses(values, mask, p, p_mask)
        L = bt.lower_loss(bt.domain_weights(torch.tensor([0.3, -0.2, 0.1]))[keys], l, n.sum())
        L.backward()
        losses[shared] = L.item()
        grads[shared] = {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
        model.zero_grad(set_to_none=True)
        a = [torch.tensor([0.3, -0.2, 0.1], requires_grad=True)]
        batch = bt.train_batch(records, keys, "cpu")
        phi = [x for x in model.parameters() if x.requires_grad]
        fwd = forward(model, off, shared)
        upper = bt.Upper(fwd, phi, bt.DomainWeighting(a, keys), None, 0.01, bt.device_copy, bt.meta_loss)
        g = bt.hypergradient(upper, bt.meta_loss(*fwd(records[:4]), records[:4]), batch, 1e-3)
        hyper[shared] = g[0]
    assert abs(losses[True] - losses[False]) <= 1e-5
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    assert max((grads[True][k] - grads[False][k]).abs().max().item() for k in grads[True]) <= 1e-5
    assert (hyper[True] - hyper[False]).abs().max().item() <= 1e-5 and hyper[False].abs().max() > 0


def test_draw_by_question():
    groups = [[0, 1, 2], [3, 4], [5], [6, 7, 8]]
    idx = bt.draw(groups, 5, 0, "train", 3, 0)
    assert len(idx) == 5 and idx == bt.draw(groups, 5, 0, "train", 3, 0)           # a pure function of the key
    cut = [g for g in groups if set(g) & set(idx) and not set(g) <= set(idx)]   # whole questions, but the last
    assert len(cut) <= 1 and all(idx[-len(set(g) & set(idx)):] == g[:len(set(g) & set(idx))] for g in cut)
    g = torch.Generator().manual_seed(zlib.crc32(repr((0, "train", 3, 0)).encode()))
    plain = bt.question_groups(list(range(9)), False)                                 # one CoT a group
    assert bt.draw(plain, 5, 0, "train", 3, 0) == torch.randint(9, (5,), generator=g).tolist()   # as before


@pytest.mark.parametrize("weighting", ["domain", "instance-table"])
def test_gradient_accumulation_is_one_larger_batch(backbone_dir, images, weighting):
    """--grad-accum 3: the same loss, per-CoT losses and weights after the step as one batch."""
    records = grouped_records(images)
    keys = torch.tensor([DOMAINS.index(r["domain"]) for r in records]) if weighting == "domain" else \
        torch.arange(len(records))
    a = [torch.tensor([0.3, -0.2, 0.1])] if weighting == "domain" else [torch.linspace(-1, 1, len(records))]
    off, out = torch.autocast("cpu", enabled=False), {}
    for accum in (1, 3):
        torch.manual_seed(0)
        model = prm.PRM.from_backbone(backbone_dir).train()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)       # the step is the gradient itself
        before = [p.detach().clone() for p in model.parameters()]
        w = bt.DomainWeighting(a, keys) if weighting == "domain" else bt.InstanceTable(a, keys, 3.0, None)
        batch = lower_step(model, opt, w, records, off, accum=accum)
        out[accum] = (batch.L_tr, batch.l, batch.n, [b - p.detach() for b, p in zip(before, model.parameters())])
    (L1, l1, n1, g1), (L3, l3, n3, g3) = out[1], out[3]
    assert abs(L1 - L3) <= 1e-6 and torch.allclose(l1, l3, atol=1e-6) and torch.equal(n1, n3)
    assert max((x - y).abs().max().item() for x, y in zip(g1, g3)) <= 1e-6
    assert max(x.abs().max().item() for x in g1) > 1e-3                   # a real step was taken


def test_held_out_evaluation_is_logged(tmp_path):
    from test_formats import labels_row, write_jsonl
    rows = [labels_row("e1", "Held one?", sample=s, correct=s == 0) for s in range(2)] + \
        [labels_row("e2", "Held two?", sample=s, correct=s == 1) for s in range(2)]
    held = write_jsonl(tmp_path / "held.jsonl", rows)
    out = str(tmp_path / "run")
    assert bt.main(["--synthetic", "--out", out, "--iterations", "4", "--unroll-steps", "1", "--train-batch", "4",
                    "--meta-batch", "4", "--eval", held, "--eval-every", "2"]) == 0
    evals = [json.loads(x) for x in open(f"{out}/eval.jsonl")]
    assert [e["iteration"] for e in evals] == [2, 4] and evals[0]["eval/questions"] == 2
    # The figures as computed by hand from the saved PRM's values on the held-out CoTs.
    model = prm.PRM.from_pretrained(out).eval()
    records, _ = prm.read_cots(held, "labels")
    with torch.no_grad():
        values, mask = prm.step_values(model, [model.encode(r) for r in records])
    pairs = [(x, p) for r, v, m in zip(records, values, mask) for x, p in zip(v[m].tolist(), r["mc"])]
    A = prm.aggregate(values, mask).tolist()
    best = [max(range(2), key=lambda i: A[q + i]) for q in (0, 2)]
    by_hand = {"eval/step_accuracy": sum((x >= 0.5) == (p >= 0.5) for x, p in pairs) / len(pairs),
               "eval/step_auc": bt.auc([x for x, _ in pairs], [p >= 0.5 for _, p in pairs]),
               "eval/best_of_n": sum(records[q + i]["correct"] for q, i in zip((0, 2), best)) / 2}
    for key, value in by_hand.items():
        assert evals[-1][key] == pytest.approx(value, abs=1e-6), key


def test_dreamprm_domain_weighting_is_alpha_of_each_cot_domain():
    """Section 1's domain_weighting, the one the run builds for --weighting domain: a raw weight per
    domain, starting uniform; each CoT's weight is its domain's alpha; the upper batch is the latest
    lower batch; the logs read alpha itself."""
    train, _ = bt.synthetic_data(0, 4, 4)
    domains = sorted({r["domain"] for r in train})
    w = bt.make_weighting(SimpleNamespace(weighting="domain"), train, domains, "cpu", None)
    assert isinstance(w, bt.DomainWeighting)
    assert [x.shape for x in w.a] == [(len(domains),)] and not w.a[0].detach().any() and w.moves
    assert w.keys.tolist() == [domains.index(r["domain"]) for r in train]
    with torch.no_grad():
        w.a[0].copy_(torch.tensor([0.5, -1.0, 2.0]))
    idx = torch.tensor([0, 5, 9, 11])
    batch = bt.TrainBatch([train[i] for i in idx], w.keys[idx], None, None, None)
    alpha = torch.nn.functional.softplus(torch.tensor([0.5, -1.0, 2.0]))
    alpha = alpha / alpha.mean()
    assert torch.allclose(w.weights(w.a, batch), alpha[[domains.index(train[i]["domain"]) for i in idx]])
    assert w.upper_batch(3, batch) is batch
    assert w.per_domain(None, train, domains) == pytest.approx(dict(zip(domains, alpha.tolist())))
