"""DreamPRM bi-level training: fit the PRM on domain-weighted step labels (lower level) while
learning the domain weights from the aggregation-function loss on a clean meta set (upper level).

Reads   --train labels.jsonl [more]  (our JSONL with MC labels, or the published DreamPRM train.json)
        --meta  cots.jsonl           (whole CoTs with `correct`, or the published meta.json)
Writes  --out RUN_DIR: prm/ (load with prm.PRM.from_pretrained(RUN_DIR)), domain_weights.json,
        domain_weights.png, metrics.jsonl, config.json, checkpoint/ (resume with --resume)

The math (symbols as in the paper; the README's "The math" explains each):
  alpha_k = softplus(a_k) / mean_j softplus(a_j)                             domain weights
  L_tr(phi, alpha) = sum_b alpha_d(b) sum_i (V_phi(x_b, yhat_bi) - p_bi)^2 / sum_b n_b
                   = sum_b w_b(alpha) l_b(phi)                               lower loss
  L_meta(phi) = mean_m (A(V_phi(x_m, yhat_m1..n)) - r_m)^2                   upper loss
  every U lower steps (AdamW on phi, lr xi), one upper step (Adam on a, meta lr) with
  v = grad_phi L_meta(phi),  eps = r / ||v||
  g_a = -xi [grad_a L_tr(phi + eps v, alpha) - grad_a L_tr(phi - eps v, alpha)] / (2 eps)

Run the toy demo (no data arguments; a small synthetic set if the toy world is not built):
    python bilevel_train.py
Real data:
    python bilevel_train.py --train labels.jsonl --meta meta.jsonl --domains ai2d,m3cot \\
        --model /models/Qwen2-VL-2B-Instruct --precision bf16 --grad-checkpointing --offload-restore \
        --out runs/dreamprm
  (fp32 master weights, bf16 compute: 16 bytes per parameter before activations, about 33 GiB for
  a 2B PRM; --compact-states and --freeze-vision take it under 20 GiB; README, the 2B memory plan)
"""

import json
import math
import os
import random
import shutil
import sys
import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import gen_cots
import mc_label
import prm

TOY_TRAIN = "toy/train_labels.jsonl"   # written by the toy pipeline (gen_cots.py --toy, mc_label.py)
TOY_META = "toy/meta_cots.jsonl"
# Defaults for real data, and the toy preset used when no data is given (a tiny PRM learns in
# minutes, and larger meta batches keep the hypergradient's noise below its signal).
DEFAULTS = dict(iterations=1000, train_batch=8, meta_batch=16, meta_lr=0.01, unroll_steps=5, log_every=10, cold_start=0)
TOY_PRESET = dict(iterations=150, train_batch=16, meta_batch=32, meta_lr=0.05, unroll_steps=5, log_every=10,
                  cold_start=0)
# DreamPRM-1.5's recipe for instance weights: one lower step per upper step (unroll 1) and a meta lr
# that lets a weight move within the few upper steps that reach it. The toy adds a cold start (the
# PRM learns the task before its judgement of instances counts) and as many lower steps as the
# domain demo (750).
INSTANCE_RECIPE = dict(unroll_steps=1)
# Time-scale matching: a table entry moves only when its CoT is drawn (a few dozen times in a toy
# run), the net's shared parameters at every upper step; on the toy world meta lr 0.1 drove the net
# to saturated weights within 50 upper steps, 0.003 and 0.01 gave the same ranking.
INSTANCE_META_LR = {"instance-table": 0.1, "instance-net": 0.01}
TOY_INSTANCE = dict(iterations=750, log_every=50, cold_start=100)


# --------------------------------------------------------------------------------------------
# Weights and losses
# --------------------------------------------------------------------------------------------

def domain_weights(a):
    """alpha = softplus(a) / mean(softplus(a)): positive, mean 1, a = 0 gives uniform weights. (K,) -> (K,)"""
    s = F.softplus(a)
    return s / s.mean()


def bounded(x, w_max=3.0):
    """Instance weights from raw values: w = w_max * sigmoid(x + logit(1 / w_max)), in (0, w_max)
    and exactly 1 at x = 0 (the published Instance Table starts at 1). Smooth, so a weight at its
    bound still gets a gradient (a clip would freeze it), and never negative (a negative weight
    would ascend an instance's loss)."""
    return w_max * torch.sigmoid(x - math.log(w_max - 1))


def instance_net(theta, values, p, mask):
    """Instance Net: a small MLP reads, for each labelled step of a CoT, the PRM's value and the
    step's MC label [V_i, p_i], and averages its outputs over the steps: (B, S) values, labels and
    mask (labelled steps) -> (B,) raw weights. (The published net reads the PRM's two answer
    probabilities alone; without the label it cannot tell a wrong label from a right one, which is
    what instance weights are for.) V and p are data here (detached): theta alone carries the
    hypergradient. theta = [W1 (H, 2), b1 (H,), W2 (1, H), b2 (1,)]."""
    W1, b1, W2, b2 = theta
    x = torch.stack([values, p], -1).to(W1.dtype)                       # (B, S, 2)
    h = F.leaky_relu(x @ W1.T + b1)                                     # (B, S, H)
    out = (h @ W2.T + b2).squeeze(-1)                                   # (B, S)
    m = mask.to(out.dtype)
    return (out * m).sum(-1) / m.sum(-1).clamp(min=1)


def init_instance_net(hidden, seed, device):
    """theta with a zero output layer: every CoT starts at weight 1."""
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(hidden, 2, generator=g) * 2 ** -0.5
    return [t.to(device).requires_grad_() for t in (W1, torch.zeros(hidden), torch.zeros(1, hidden), torch.zeros(1))]


def instance_weights(a, batch_keys, mode, steps=None, w_max=3.0):
    """Unnormalised instance weights w_b in (0, w_max): a CoT's table entry (instance-table) or the
    Instance Net's output on its steps (instance-net). (B,)"""
    if mode == "instance-table":
        return bounded(a[batch_keys], w_max)
    values, p, mask = steps
    return bounded(instance_net(a, values.detach(), p, mask), w_max)


def cot_weights(a, batch_keys, mode, steps=None, w_max=3.0):
    """alpha_b for each CoT of a batch (B,): its domain's weight (domain), its instance weight
    divided by the batch's mean (instance modes), or 1 (fixed).
    a: raw domain weights (K,), raw instance weights (N,), or the net's theta; steps: (values, p,
    mask), each (B, S), for the net. Dividing by the mean, as domain weights are normalised, keeps
    only the relative weights: a common drift of all weights (up or down) would otherwise act as a
    second, uncontrolled learning rate of the lower level (seen on the toy world: the net drove
    every weight to 0, the table every weight up)."""
    if mode == "domain":
        return domain_weights(a)[batch_keys]
    if mode.startswith("instance"):
        w = instance_weights(a, batch_keys, mode, steps, w_max)
        return w / w.mean()
    return torch.ones(len(batch_keys), dtype=a.dtype, device=a.device)


def detached(a):
    return [x.detach() for x in a] if isinstance(a, list) else a.detach()


def step_losses(values, mask, p, p_mask):
    """Per-CoT lower losses l_b = sum_i (V_bi - p_bi)^2 over labelled steps, and n_b.

    values (B, S), mask (B, S) from prm.step_values; p (B, S) MC labels; p_mask (B, S) labelled steps.
    Returns l (B,) and n (B,).
    """
    m = (mask & p_mask).to(values.dtype)
    return ((values - p) ** 2 * m).sum(-1), m.sum(-1)


def lower_loss(values, mask, p, p_mask, alpha_b):
    """L_tr = sum_b alpha_b l_b / sum_b n_b (each labelled step counts once). Returns (L_tr, l (B,), n (B,))."""
    l, n = step_losses(values, mask, p, p_mask)
    return (alpha_b * l).sum() / n.sum().clamp(min=1), l, n


def meta_loss(values, mask, r, loss="mse", aggregation=True, p=None, p_mask=None):
    """Upper loss on whole meta CoTs.

    aggregation: L_meta = mean_m (A(V_m1..n) - r_m)^2 with A = prm.aggregate (mean_logit); BCE optional.
    aggregation=False (the w/o-AFL ablation): step-level MSE against meta MC labels p where given,
    else the last step against r (p_mask marks which steps have a target).
    """
    if aggregation:
        A = prm.aggregate(values, mask, "mean_logit")           # (M,)
        if loss == "bce":
            return F.binary_cross_entropy(A.clamp(prm.V_CLAMP, 1 - prm.V_CLAMP), r)
        return ((A - r) ** 2).mean()
    l, n = step_losses(values, mask, p, p_mask)
    return (l / n.clamp(min=1)).mean()


# --------------------------------------------------------------------------------------------
# The hypergradient (finite difference, as DARTS and Betty's "darts" method)
# --------------------------------------------------------------------------------------------

def hypergradient(phi, a, meta_loss_fn, train_losses_fn, weights_fn, xi, r=0.01, offload=False):
    """g_a = -xi [grad_a L_tr(phi + eps v, a) - grad_a L_tr(phi - eps v, a)] / (2 eps).

    phi: list of trainable tensors; a: raw weights (requires_grad).
    meta_loss_fn(): L_meta at the current phi (with autograd graph).
    train_losses_fn(): per-CoT losses l_b of the latest train batch (B,), run without autograd.
    weights_fn(a): w_b(a) (B,) so that L_tr = sum_b w_b(a) l_b.
    Because a enters L_tr only through w_b, grad_a L_tr(phi +- eps v) = sum_b l_b(phi +- eps v) grad_a w_b:
    two forward passes, no backward through the network. phi is restored bit for bit.
    a may be one tensor or a list of tensors (the Instance Net's theta); g_a has the same form.
    offload: the exact copy of phi kept for the restore lives in CPU memory (pinned on CUDA), not
    beside phi on the GPU: 4 bytes per parameter less GPU memory, the same bits restored.
    Returns (g_a, L_meta value).
    """
    L_meta = meta_loss_fn()
    grads = torch.autograd.grad(L_meta, phi, allow_unused=True)     # v = grad_phi L_meta(phi)
    # Tensors the meta batch does not reach (e.g. the vision tower on text) have v = 0: skip them.
    reached = [(p, g.detach()) for p, g in zip(phi, grads) if g is not None]
    phi, v = [p for p, _ in reached], [g for _, g in reached]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in v])).item() \
        if v else 0.0                                           # ||v||_2, one device sync
    params = a if isinstance(a, list) else [a]
    if norm == 0:
        zeros = [torch.zeros_like(x) for x in params]
        return (zeros if isinstance(a, list) else zeros[0]), L_meta.item()
    eps = r / norm
    if offload:                                                 # exact restore, not p - eps v + eps v
        saved = [p.detach().to("cpu", copy=True).pin_memory() if p.is_cuda else p.detach().to("cpu", copy=True)
                 for p in phi]
    else:
        saved = [p.detach().clone() for p in phi]
    with torch.no_grad():
        for p, g in zip(phi, v):
            p.add_(g, alpha=eps)                                # phi + eps v
        l_plus = train_losses_fn()                              # (B,)
        for p, s, g in zip(phi, saved, v):
            p.copy_(s).add_(g, alpha=-eps)                      # phi - eps v
        l_minus = train_losses_fn()                             # (B,)
        for p, s in zip(phi, saved):
            p.copy_(s)
    with torch.enable_grad():
        w = weights_fn(a)                                       # (B,)
        s = ((l_plus - l_minus).detach().to(w.dtype) * w).sum() / (2 * eps)
        g_a = [-xi * g for g in torch.autograd.grad(s, params)]
    return (g_a if isinstance(a, list) else g_a[0]), L_meta.item()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def synthetic_data(seed=0, n_per_domain=48, n_meta=32):
    """A small labelled set made on the spot (text only), for runs with no data and for tests.

    Each CoT has 1 to 4 steps; a step either "checks out" or "fails", and a CoT is correct when no
    step fails. Domains: clean (labels p = 1 before the first failed step, 0 from it on), noisy
    (the same labels flipped), random (labels drawn at random). The meta set is clean.
    Returns (train, meta) record lists.
    """
    rng = random.Random(seed)

    def cot(i):
        n = rng.randint(1, 4)
        bad_at = rng.randrange(n) if rng.random() < 0.5 else n
        steps = [f"Step {k + 1}: the check " + ("fails" if k == bad_at else "passes") + "." for k in range(n)]
        true_p = [1.0 if k < bad_at else 0.0 for k in range(n)]
        return {"id": f"s{i}", "question": "Does every check pass?", "answer": "yes", "image": None,
                "steps": steps, "final": "yes" if bad_at == n else "no", "correct": bad_at == n,
                "_image": None, "_question": "Does every check pass?"}, true_p

    train = []
    for d in ("clean", "noisy", "random"):
        for i in range(n_per_domain):
            rec, p = cot(len(train))
            rec["mc"] = {"clean": p, "noisy": [1 - x for x in p],
                         "random": [float(rng.random() < 0.5) for _ in p]}[d]
            rec["domain"], rec["_key"] = d, f"{d}/{rec['id']}#0"
            train.append(rec)
    meta = []
    for i in range(n_meta):
        rec, _ = cot(10_000 + i)
        rec["domain"] = "meta"
        meta.append(rec)
    return train, meta


def build_toy_world(seed):
    """gen_cots.py --toy, then MC labels for the training CoTs and (for rerank.py's step report) the test CoTs."""
    print(f"building the toy world (seed {seed}): gen_cots.py --toy, then mc_label.py")
    gen_cots.main(["--toy", "--seed", str(seed)])
    for name in ("train", "test"):
        mc_label.main(["--cots", os.path.join(gen_cots.TOY_DIR, f"{name}_cots.jsonl"), "--seed", str(seed)])


def read_inputs(args):
    """Train and meta records from the files given (every format of prm.read_cots), with a line
    per file on what was read and skipped. Duplicate records within or across --train files are
    an error."""
    train, train_skips = [], []
    for path in args.train:
        recs, skips = prm.read_cots(path, "labels", args.image_root, args.format, args.domain)
        print(f"{path}: {len(recs)} training CoTs" + (f" ({recs[0]['_format']} format)" if recs else "")
              + (f"; {prm.skip_report(recs, skips)}" if skips else ""))
        train += recs
        train_skips += skips
    prm.check_unique(train, prm.record_key, "record key (question, image and steps, or id and sample)")
    meta, skips = prm.read_cots(args.meta, "cots", args.image_root, args.format, args.domain)
    print(f"{args.meta}: {len(meta)} meta CoTs" + (f"; {prm.skip_report(meta, skips)}" if skips else ""))
    # Sorted by key: the run depends on the set of records, not on the order a concurrent stage wrote them.
    train.sort(key=prm.record_key)
    meta.sort(key=prm.record_key)
    if not meta:
        raise prm.DataError("no usable meta records: " + (prm.skip_report(meta, skips) or "the file is empty"),
                            file=args.meta)
    return train, meta, {s.domain for s in train_skips}


def check_meta(meta, train, args):
    """A meta set must teach something: both correct and incorrect CoTs (else the upper loss has one
    target and cannot tell domains apart), and no question that is also in the training data."""
    if args.weighting != "fixed" and len({r["correct"] for r in meta}) < 2:
        which = "correct" if meta[0]["correct"] else "incorrect"
        msg = (f"all {len(meta)} usable meta CoTs are {which}: the upper loss then has a single target "
               f"and cannot tell the domains apart")
        if not args.allow_one_class_meta:
            raise prm.DataError(msg + " (--allow-one-class-meta runs anyway)", file=args.meta)
        print(f"warning: {msg}")
    if not args.allow_overlap:
        seen = {prm.question_key(r): r for r in train}
        for m in meta:
            t = seen.get(prm.question_key(m))
            if t is not None:
                raise prm.DataError(f"this meta question is also in the training data ({t['_src'][0]}:"
                                    f"{t['_src'][1]}; same text and image); --allow-overlap to run anyway",
                                    *m["_src"])


def load_data(args):
    """Train and meta records (validated), the chosen domains, and the final-answer rule."""
    if not args.train and not args.meta:
        if args.synthetic:
            print("using the small synthetic set (clean, noisy and random labels)")
            train, meta = synthetic_data(args.seed)
            return train, meta, sorted({r["domain"] for r in train})
        if not (os.path.isfile(TOY_TRAIN) and os.path.isfile(TOY_META)):
            build_toy_world(args.seed)
        args.train, args.meta = [TOY_TRAIN], TOY_META
    if not args.train or not args.meta:
        raise prm.DataError("give both --train and --meta (or neither, for the toy demo)")
    train, meta, skipped_domains = read_inputs(args)
    present = sorted({r["domain"] for r in train} | skipped_domains)
    usable = sorted({r["domain"] for r in train if any(p is not None for p in r["mc"])})
    if not usable:
        raise prm.DataError("no usable training CoTs (none with steps and step labels)", file=", ".join(args.train))
    domains = args.domains or usable
    unknown = [d for d in domains if d not in present]
    if unknown:
        raise prm.DataError(f"unknown domain(s) {', '.join(unknown)}; domains present: {', '.join(present)}",
                            field="--domains")
    left_out = sorted(set(present) - set(domains))
    if left_out:
        why = "not in --domains" if args.domains is not None else "no usable records"
        print(f"domains left out ({why}): {', '.join(left_out)}")
    train = [r for r in train if r["domain"] in domains and any(p is not None for p in r["mc"])]
    for d in domains:
        if not any(r["domain"] == d for r in train):
            raise prm.DataError(f"domain '{d}' has no usable records (none with steps and labels)",
                                field="--domains")
    check_meta(meta, train, args)
    return train, meta, domains


def drop_long(model, records, what):
    """Records whose encoded CoT fits the PRM's max_length; a longer one is skipped and counted,
    never cut in the middle of a step. Returns (records, number skipped)."""
    kept = [r for r in tqdm(records, desc=f"lengths ({what})", leave=False, dynamic_ncols=True)
            if model.fits(encode(model, r))]
    if len(kept) < len(records):
        print(f"{len(records) - len(kept)} {what} CoTs longer than {model.max_length} tokens: skipped")
    if not kept:
        raise prm.DataError(f"no {what} CoT fits --max-length {model.max_length}", field="--max-length")
    return kept, len(records) - len(kept)


def parse_domains(text):
    """--domains: comma-separated names, stripped; an empty list, an empty name or a repeat is an error."""
    names = [d.strip() for d in text.split(",")]
    if not any(names):
        raise prm.DataError("an empty list; leave the flag out to train on every domain", field="--domains")
    if "" in names:
        raise prm.DataError(f"an empty name in {text!r}", field="--domains")
    repeated = sorted({d for d in names if names.count(d) > 1})
    if repeated:
        raise prm.DataError(f"named twice: {', '.join(repeated)}", field="--domains")
    return names


def final_answer_rule(args, train):
    """--final-answer auto: 'drop' when any training file is published DreamPRM data (its prefixes
    never carry the answer line), else 'last-step'. One rule for train, meta and test alike."""
    if args.final_answer != "auto":
        return args.final_answer
    return "drop" if any(r.get("_format") == "dreamprm" for r in train) else "last-step"


def encode(model, rec):
    """Encoded CoT; kept on the record when it has no image (image CoTs share an LRU image cache,
    so memory stays bounded on large image sets)."""
    if "_enc" in rec:
        return rec["_enc"]
    e = model.encode(rec)
    if rec.get("_image") is None:
        rec["_enc"] = e
    return e


def label_tensors(records, S, device, dtype=torch.float32):
    """MC labels (B, S) and which steps are labelled (B, S)."""
    p = torch.zeros(len(records), S, dtype=dtype)
    p_mask = torch.zeros(len(records), S, dtype=torch.bool)
    for b, rec in enumerate(records):
        for i, x in enumerate(rec["mc"]):
            if x is not None:
                p[b, i], p_mask[b, i] = x, True
    return p.to(device), p_mask.to(device)


def meta_targets(records, S, device, dtype=torch.float32):
    """For the w/o-AFL ablation: meta MC labels where present, else the last step against r."""
    return label_tensors([r if r.get("mc") else dict(r, mc=[None] * (len(r["steps"]) - 1) + [float(r["correct"])])
                          for r in records], S, device, dtype)


def label_batch(records, keys, device):
    """A TrainBatch of records without a forward pass: what the hypergradient re-evaluates."""
    S = max(len(r["steps"]) for r in records)
    p, p_mask = label_tensors(records, S, device)
    return TrainBatch(records, keys, p, p_mask, None, None, p_mask.sum(-1).float())


def auc(scores, positive):
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney); None if a class is empty."""
    pos = [s for s, y in zip(scores, positive) if y]
    neg = sorted(s for s, y in zip(scores, positive) if not y)
    if not pos or not neg:
        return None
    import bisect
    wins = sum(bisect.bisect_left(neg, s) + 0.5 * (bisect.bisect_right(neg, s) - bisect.bisect_left(neg, s)) for s in pos)
    return wins / (len(pos) * len(neg))


def key_auc(weights, train):
    """Toy world only (its records know whether their answer key is corrupted): the AUC of the
    CoT weights for telling clean-key CoTs from corrupted-key ones, overall and inside each domain
    that has both."""
    known = [(w, r) for w, r in zip(weights, train) if "key_corrupted" in (r.get("toy") or {})]
    if not known:
        return {}
    out = {"overall": auc([w for w, _ in known], [not r["toy"]["key_corrupted"] for _, r in known])}
    for d in sorted({r["domain"] for _, r in known}):
        out[d] = auc([w for w, r in known if r["domain"] == d], [not r["toy"]["key_corrupted"] for w, r in known
                                                                 if r["domain"] == d])
    return {k: v for k, v in out.items() if v is not None}


def sample(n, k, seed, *key):
    """k indices in [0, n), a pure function of (seed, key): a resumed run draws the same batches."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((seed,) + key).encode()))
    return torch.randint(n, (k,), generator=g).tolist()


# --------------------------------------------------------------------------------------------
# One lower step, one upper step
# --------------------------------------------------------------------------------------------

def forward(model, records, autocast):
    """Packed step values of a list of records: (B, S) values, (B, S) mask."""
    with autocast:
        return prm.step_values(model, [encode(model, r) for r in records])


@dataclass
class TrainBatch:
    """The latest lower step's batch: the hypergradient re-evaluates its per-CoT losses."""
    records: list
    keys: torch.Tensor      # (B,) index into a of each CoT (its domain, or itself)
    p: torch.Tensor         # (B, S) MC labels
    p_mask: torch.Tensor    # (B, S) labelled steps
    L_tr: torch.Tensor      # the weighted loss (scalar, detached)
    l: torch.Tensor         # (B,) per-CoT losses
    n: torch.Tensor         # (B,) labelled steps per CoT


def lower_step(model, opt_phi, a, records, keys, weighting, autocast, w_max=3.0):
    """phi <- AdamW step on L_tr(phi, alpha) with alpha fixed (a detached)."""
    values, mask = forward(model, records, autocast)                     # (B, S)
    p, p_mask = label_tensors(records, values.shape[1], values.device)
    alpha_b = cot_weights(detached(a), keys, weighting, (values.float(), p, mask & p_mask), w_max)
    L_tr, l, n = lower_loss(values.float(), mask, p, p_mask, alpha_b)
    if torch.isfinite(L_tr):
        opt_phi.zero_grad(set_to_none=True)
        L_tr.backward()
        opt_phi.step()
        opt_phi.zero_grad(set_to_none=True)      # the gradients are spent: free them before the hypergradient
    return TrainBatch(records, keys, p, p_mask, L_tr.detach(), l.detach(), n)


def upper_step(model, phi, a, opt_a, batch, m_records, xi, args, autocast):
    """a <- Adam step on the finite-difference hypergradient g_a. Returns L_meta (NaN, and no
    step, when L_meta or g_a is not finite)."""
    device = model.device
    r = torch.tensor([float(x["correct"]) for x in m_records], device=device)   # (M,)

    def meta_loss_fn():
        values, mask = forward(model, m_records, autocast)
        pm, pm_mask = meta_targets(m_records, values.shape[1], device) if args.no_aggregation else (None, None)
        return meta_loss(values.float(), mask, r, args.upper_loss, not args.no_aggregation, pm, pm_mask)

    def train_losses_fn():
        values, mask = forward(model, batch.records, autocast)
        return step_losses(values.float(), mask, batch.p, batch.p_mask)[0]      # (B,)

    def weights_fn(a_):
        steps = None
        if args.weighting == "instance-net":                            # the net reads V at phi (restored)
            with torch.no_grad():
                values, mask = forward(model, batch.records, autocast)
            steps = (values.float(), batch.p, mask & batch.p_mask)
        return cot_weights(a_, batch.keys, args.weighting, steps, args.weight_max) / \
            batch.n.sum().clamp(min=1)                                  # w_b(a)

    g_a, L_meta = hypergradient(phi, a, meta_loss_fn, train_losses_fn, weights_fn, xi, args.fd_radius,
                                getattr(args, "offload_restore", False))
    params, grads = (a, g_a) if isinstance(a, list) else ([a], [g_a])
    if not all(torch.isfinite(g).all() for g in grads):
        return float("nan")                                             # the caller stops the run
    opt_a.zero_grad(set_to_none=True)
    for x, g in zip(params, grads):
        x.grad = g
    opt_a.step()
    return L_meta


# --------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON, written atomically)
# --------------------------------------------------------------------------------------------

def optimizer_tensors(opt, prefix):
    """An optimizer's per-parameter state as flat tensors {prefix.i.name: tensor}."""
    out = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for name, t in opt.state.get(p, {}).items():
            out[f"{prefix}.{i}.{name}"] = t if torch.is_tensor(t) else torch.tensor(t)
    return out


def load_optimizer(opt, tensors, prefix):
    params = opt.param_groups[0]["params"]
    step_on_device = opt.defaults.get("fused") or opt.defaults.get("capturable")   # else "step" stays on CPU
    for key, t in tensors.items():
        if key.startswith(prefix + "."):
            _, i, name = key.rsplit(".", 2)
            p = params[int(i)]
            opt.state.setdefault(p, {})[name] = t.to(p.device) if name != "step" or step_on_device else t
    return opt


def trainable_state(model):
    """What a checkpoint must hold of the model: every trainable tensor (backbone and head)."""
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def save_checkpoint(run_dir, model, a, opt_phi, opt_a, iteration):
    with prm.atomic_dir(os.path.join(run_dir, "checkpoint")) as tmp:
        prm.save_tensors_atomic(os.path.join(tmp, "model.safetensors"), trainable_state(model))
        tensors = {f"theta.{i}": x.detach() for i, x in enumerate(a)} if isinstance(a, list) else {"a": a.detach()}
        tensors.update(optimizer_tensors(opt_phi, "phi"))
        tensors.update(optimizer_tensors(opt_a, "a"))
        prm.save_tensors_atomic(os.path.join(tmp, "state.safetensors"), tensors)
        prm.write_json_atomic(os.path.join(tmp, "state.json"), {"iteration": iteration})


def load_checkpoint(run_dir, model, a, opt_phi, opt_a):
    """Restore model, a and both optimizers; returns the iteration to continue from."""
    from safetensors.torch import load_file
    ck = os.path.join(run_dir, "checkpoint")
    weights = load_file(os.path.join(ck, "model.safetensors"))
    model.load_state_dict({k: v.to(model.device) for k, v in weights.items()}, strict=False)
    tensors = load_file(os.path.join(ck, "state.safetensors"))
    with torch.no_grad():
        for i, x in enumerate(a if isinstance(a, list) else [a]):
            x.copy_(tensors[f"theta.{i}" if isinstance(a, list) else "a"].to(x.device))
    load_optimizer(opt_phi, tensors, "phi")
    load_optimizer(opt_a, tensors, "a")
    with open(os.path.join(ck, "state.json")) as f:
        return json.load(f)["iteration"]


# --------------------------------------------------------------------------------------------
# Outputs a person reads
# --------------------------------------------------------------------------------------------

def write_weights(run_dir, alpha, weighting, history):
    """domain_weights.json: the latest weights ("final" once the run ends) and every logged iteration's."""
    prm.write_json_atomic(os.path.join(run_dir, "domain_weights.json"),
                          {"final": alpha, "weighting": weighting, "history": history})


def plot_weights(history, names, path):
    """domain_weights.png: alpha_k over the logged iterations."""
    its = [h["iteration"] for h in history]
    series = {n: [(i, h["alpha"][n]) for i, h in zip(its, history)] for n in names}
    y_max = max([1.5] + [y for points in series.values() for _, y in points]) * 1.05
    ticks = [(its[0], f"iteration {its[0]}"), (its[-1], str(its[-1]))] if its else []
    legend = {n: f"{n} {history[-1]['alpha'][n]:.2f}" if history else n for n in names}
    prm.line_plot(path, "domain weights alpha", series, ticks, y_max, lambda y: f"{y:.2f}", legend)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv):
    ap = prm.Parser(__doc__)
    ap.add_argument("--train", nargs="*", default=[], help="training labels: our labels.jsonl or published train.json")
    ap.add_argument("--meta", default=None, help="meta CoTs with correctness: our cots.jsonl or published meta.json")
    ap.add_argument("--domains", default=None, help="comma-separated training domains (default: every domain "
                    "with usable records)")
    ap.add_argument("--image-root", default=None, help="folder image paths are relative to (default: each file's folder)")
    prm.add_format_args(ap)
    ap.add_argument("--final-answer", choices=("auto",) + prm.FINAL_RULES, default="auto",
                    help="the final answer line: joins the last step (last-step) or is never encoded (drop), "
                    "for train, meta and test alike (auto: drop for published DreamPRM data, else last-step)")
    ap.add_argument("--max-side", type=prm.number(int, 0), default=prm.MAX_SIDE, help="images shrink until their "
                    "longest side is at most this many pixels, as in the published code (0: never; 512 gives 180 "
                    "image tokens for a 1920x1080 image)")
    ap.add_argument("--min-pixels", type=prm.number(int, 1), default=None, help="image processor's minimum pixels "
                    "(default: the processor's own)")
    ap.add_argument("--max-pixels", type=prm.number(int, 1), default=None, help="image processor's maximum pixels "
                    "(default: the processor's own)")
    ap.add_argument("--max-length", type=prm.number(int, 1), default=None, help="longest CoT in tokens; longer "
                    "ones are skipped and counted (default: the backbone's positions)")
    ap.add_argument("--allow-overlap", action="store_true", help="allow meta questions that are also in the "
                    "training data (same text and image)")
    ap.add_argument("--allow-one-class-meta", action="store_true", help="run even when every meta CoT is "
                    "correct (or every one incorrect), with a warning")
    ap.add_argument("--model", default="tiny", help="backbone directory (save_pretrained format), or 'tiny'")
    ap.add_argument("--out", default="runs/toy", help="run directory")
    ap.add_argument("--iterations", type=prm.number(int, 1), default=None, help="outer iterations, each U lower "
                    "steps + 1 upper step (>= 1; default: 1000; toy 150; toy instance modes 750)")
    ap.add_argument("--unroll-steps", type=prm.number(int, 1), default=None, help="U: lower steps per upper step "
                    "(>= 1; default: 5; instance modes 1)")
    ap.add_argument("--train-batch", type=prm.number(int, 1), default=None, help="training CoTs per lower step "
                    "(>= 1; default: 8; toy 16)")
    ap.add_argument("--meta-batch", type=prm.number(int, 1), default=None, help="meta CoTs per upper step "
                    "(>= 1; default: 16; toy 32)")
    ap.add_argument("--lr", type=prm.number(float, 0, above=True), default=None, help="xi, the lower (PRM) "
                    "learning rate (> 0 and finite; default: 5e-7; toy and --model tiny 1e-4)")
    ap.add_argument("--meta-lr", type=prm.number(float, 0, above=True), default=None, help="Adam learning rate "
                    "of the raw weights a (> 0; default: 0.01; toy 0.05; instance-table 0.1, instance-net 0.01)")
    ap.add_argument("--weight-decay", type=prm.number(float, 0), default=0.0, help="AdamW weight decay on phi (>= 0)")
    ap.add_argument("--fd-radius", type=prm.number(float, 0, above=True), default=0.01, help="r: finite-difference "
                    "radius, eps = r / ||v|| (> 0)")
    ap.add_argument("--upper-loss", choices=["mse", "bce"], default="mse", help="upper loss on A(V) against r")
    ap.add_argument("--weighting", choices=["domain", "fixed", "instance-table", "instance-net", "instance"],
                    default="domain", help="domain: DreamPRM; fixed: vanilla PRM (uniform, no upper level); "
                    "instance-table: one weight per training CoT; instance-net: a small net maps a CoT's step "
                    "values to its weight (DreamPRM-1.5); instance: instance-table")
    ap.add_argument("--weight-max", type=prm.number(float, 1, above=True), default=3.0, help="instance modes: "
                    "weights lie in (0, this) (> 1), 1 at the start")
    ap.add_argument("--instance-batch", type=prm.number(int, 1), default=None, help="instance modes: training CoTs "
                    "whose weights each upper step moves (>= 1; default: 4 x --train-batch)")
    ap.add_argument("--cold-start", type=prm.number(int, 0), default=None, help="outer iterations of plain "
                    "training before the weights move (>= 0; default: 0; toy instance modes 100)")
    ap.add_argument("--net-hidden", type=prm.number(int, 1), default=64, help="instance-net: hidden width (>= 1)")
    ap.add_argument("--no-aggregation", action="store_true",
                    help="ablation: upper loss is step-level MSE instead of the aggregation-function loss")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: bf16 compute with fp32 master weights (updates are never rounded away)")
    ap.add_argument("--freeze-vision", action="store_true", help="keep the vision tower fixed (a third of a 2B "
                    "model's parameters: less memory; the published code trains every parameter)")
    ap.add_argument("--offload-restore", action="store_true", help="keep the hypergradient's exact copy of phi in "
                    "CPU memory (pinned), not on the GPU (4 bytes per parameter less; bitwise the same)")
    ap.add_argument("--compact-states", action="store_true", help="keep AdamW's two moments in bf16 with "
                    "stochastic rounding: 4 bytes per parameter less, not exact (see README, the 2B memory plan)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    ap.add_argument("--save-every", type=prm.number(int, 1), default=50, help="checkpoint every N outer iterations (>= 1)")
    ap.add_argument("--log-every", type=prm.number(int, 1), default=None, help="metrics and weights every N outer "
                    "iterations (>= 1; default: 10; toy instance modes 50)")
    ap.add_argument("--synthetic", action="store_true", help="with no data: a small synthetic set instead of the toy world")
    ap.add_argument("--no-baseline", action="store_true", help="toy demo: skip the vanilla PRM baseline "
                    "(by default a toy DreamPRM run also trains one into OUT-vanilla, for rerank.py)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (the "
                    "settings must match the stored config.json, except --iterations upward, --device, "
                    "--save-every and --log-every)")
    ap.add_argument("--overwrite", action="store_true", help="replace the outputs of another run in --out")
    ap.add_argument("--seed", type=prm.number(int, 0), default=0, help="seed for the value head and the batch "
                    "order (>= 0)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ap.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    args = ap.parse_args(argv)
    toy = not args.train and not args.meta
    args.weighting = "instance-table" if args.weighting == "instance" else args.weighting
    instance = args.weighting.startswith("instance")
    presets = ([dict(INSTANCE_RECIPE, meta_lr=INSTANCE_META_LR[args.weighting])] if instance else []) + \
        ([TOY_INSTANCE] if instance and toy else []) + [TOY_PRESET if toy else DEFAULTS]
    for preset in presets:
        for k, v in preset.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    if args.domains is not None:                  # checked before any data or model is read
        args.domains = parse_domains(args.domains)
    if args.instance_batch is None:
        args.instance_batch = 4 * args.train_batch
    if args.lr is None:
        args.lr = 1e-4 if toy or args.model == "tiny" else 5e-7
    return args


def freeze_vision(model):
    """Train the language model and the value head only: the vision tower keeps its weights (no
    gradients, no optimizer state, no hypergradient buffers for it)."""
    vision = getattr(model.backbone, "visual", None)
    if vision is None:
        raise prm.DataError("this backbone has no vision tower to freeze", field="--freeze-vision")
    for p in vision.parameters():
        p.requires_grad_(False)


def stochastic_round_bf16(x, generator):
    """fp32 -> bf16, rounded up or down at random so that E[result] = x (the error is below one
    bf16 spacing, 2^-7 of the value). Round-to-nearest would drop every increment below half a
    spacing: an Adam second moment updated by 0.001 (g^2 - s) would stop moving."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class CompactAdamW(torch.optim.Optimizer):
    """AdamW whose two moments are stored in bf16 (4 bytes per parameter instead of 8) and written
    back with stochastic rounding; the update itself is computed in fp32 on the fp32 weights.
    Not exact: each stored moment is off by less than one bf16 spacing, unbiased. Work goes in
    chunks of CHUNK elements, so its temporaries stay small beside a 233M-element embedding. The
    rounding noise is drawn from a generator seeded by (seed, step, tensor): a resumed run draws
    the same."""

    CHUNK = 1 << 22

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

    def init_state(self, p):
        state = self.state[p]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, dtype=torch.bfloat16),
                         exp_avg_sq=torch.zeros_like(p, dtype=torch.bfloat16))
        return state

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.init_state(p)
                state["step"] += 1
                t = int(state["step"])
                gen = torch.Generator(p.device).manual_seed(zlib.crc32(repr((self.seed, t, j)).encode()))
                c1, c2 = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
                flat = [p.view(-1), p.grad.reshape(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)]
                for i in range(0, p.numel(), self.CHUNK):
                    w, g, m16, s16 = (x[i:i + self.CHUNK] for x in flat)
                    m = m16.float().lerp_(g, 1 - beta1)                          # m = b1 m + (1 - b1) g
                    s = s16.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)  # s = b2 s + (1 - b2) g^2
                    m16.copy_(stochastic_round_bf16(m, gen))
                    s16.copy_(stochastic_round_bf16(s, gen))
                    w.mul_(1 - group["lr"] * group["weight_decay"])
                    w.addcdiv_(m, s.sqrt_().div_(c2).add_(group["eps"]), value=-group["lr"] / c1)


def lower_optimizer(phi, lr, weight_decay=0.0, fused=None, compact=False, seed=0):
    """AdamW on phi. fused (default: when phi is on CUDA) runs one kernel per step that updates
    every tensor in place. torch's default on CUDA, foreach, first computes sqrt(v_hat) for all of
    phi at once: a temporary of 4 bytes per parameter that is alive while phi, its gradients and
    both moments are too, which makes the optimizer step the peak of a 2B run (20 instead of 16
    bytes per parameter). Same arithmetic, agreement with the per-tensor loop tested. On CPU torch
    loops over tensors (temporaries of one tensor at a time). compact (--compact-states):
    CompactAdamW, bf16 moments."""
    if compact:
        return CompactAdamW(phi, lr=lr, weight_decay=weight_decay, seed=seed)
    if fused is None:
        fused = bool(phi) and all(p.is_cuda for p in phi)
    return torch.optim.AdamW(phi, lr=lr, weight_decay=weight_decay, fused=fused or None)


def enable_checkpointing(model):
    """Recompute activations in backward (transformers renamed the method in 5.2x; use what exists)."""
    bb = model.backbone
    (getattr(bb, "activation_checkpointing_enable", None) or bb.gradient_checkpointing_enable)()


class Diverged(RuntimeError):
    pass


# Flags that may differ when a run is resumed (--iterations only upward); every other setting in
# config.json must match, or the resumed run would silently mix two experiments.
RESUMABLE = ("iterations", "device", "save_every", "log_every", "resume", "overwrite", "no_baseline")
RUN_OUTPUTS = ("metrics.jsonl", "config.json", "domain_weights.json", "domain_weights.png", "prm", "checkpoint")


def prepare_run_dir(args, config):
    """Check --out before any model loads: writable; --resume only onto a checkpoint whose stored
    config matches; no silent overwrite of another run. Returns the checkpoint's iteration or 0."""
    out = args.out
    prm.check_writable(out)
    prm.recover_dir(os.path.join(out, "checkpoint"))
    state = os.path.join(out, "checkpoint", "state.json")
    if args.resume:
        if not os.path.isfile(state):
            raise prm.DataError("no checkpoint to resume from", file=out)
        with open(os.path.join(out, "config.json")) as f:
            stored = json.load(f)
        new = json.loads(json.dumps(config))                   # tuples and lists compare alike
        differ = sorted(k for k in set(stored) & set(new) if k not in RESUMABLE and stored[k] != new[k])
        if differ:
            raise prm.DataError("--resume with other settings than the stored run: "
                                + ", ".join(f"{k} {stored[k]!r} -> {new[k]!r}" for k in differ), file=out)
        with open(state) as f:
            at = json.load(f)["iteration"]
        if args.iterations < at:
            raise prm.DataError(f"the checkpoint is at iteration {at}; --iterations {args.iterations} is below it",
                                file=out, field="--iterations")
        return at
    present = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(out, n))]
    if present and not args.overwrite:
        what = "a checkpoint: pass --resume to continue it" if "checkpoint" in present else \
            f"another run's outputs ({', '.join(present)})"
        raise prm.DataError(f"the run directory holds {what}, --overwrite to replace them, or choose another --out",
                            file=out)
    for n in present:
        path = os.path.join(out, n)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return 0


def baseline_argv(argv, baseline, resume):
    """The vanilla baseline's flags: every flag the user gave except --weighting, --out, --resume and
    --overwrite (which are the baseline's own)."""
    out, skip = [], False
    for a in argv:
        name = a.split("=", 1)[0]
        if skip or name in ("--weighting", "--out", "--resume", "--overwrite"):
            skip = not skip and name in ("--weighting", "--out") and "=" not in a
            continue
        out.append(a)
    return out + ["--weighting", "fixed", "--out", baseline] + (["--resume"] if resume else [])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    toy_demo = not args.train and not args.meta and not args.synthetic
    device = prm.pick_device(args.device)
    torch.manual_seed(args.seed)
    train, meta, domains = load_data(args)
    final_answer = final_answer_rule(args, train)
    print(f"{len(train)} training CoTs in {len(domains)} domains: "
          + ", ".join(f"{d} {sum(r['domain'] == d for r in train)}" for d in domains) + f"; {len(meta)} meta CoTs")

    model_dir = prm.resolve_model(args.model)
    config = dict(vars(args), domains=domains, n_train=len(train), n_meta=len(meta), final_answer=final_answer,
                  model_dir=model_dir)
    start = prepare_run_dir(args, config)
    prm.write_json_atomic(os.path.join(args.out, "config.json"), config)

    xi = args.lr
    model = prm.PRM.from_backbone(model_dir, seed=args.seed, trust_remote_code=args.trust_remote_code).to(device)
    model.final_answer = final_answer
    model.max_side, model.min_pixels, model.max_pixels = args.max_side or None, args.min_pixels, args.max_pixels
    model.max_length = args.max_length or model.max_length
    train, long_train = drop_long(model, train, "training")
    meta, long_meta = drop_long(model, meta, "meta")
    for d in domains:
        if not any(r["domain"] == d for r in train):
            raise prm.DataError(f"domain '{d}' has no CoT within --max-length {model.max_length}", field="--domains")
    model.train()
    if args.freeze_vision:
        freeze_vision(model)
    if args.grad_checkpointing:
        enable_checkpointing(model)
    phi = [p for p in model.parameters() if p.requires_grad]
    dom_index = {d: k for k, d in enumerate(domains)}
    # Raw weights: one per domain, one per training CoT, or the Instance Net's theta; all start uniform.
    instance = args.weighting.startswith("instance")
    if args.weighting == "instance-net":
        a = init_instance_net(args.net_hidden, args.seed, device)
    else:
        a = torch.zeros(len(train) if instance else len(domains), device=device, requires_grad=True)
    opt_phi = lower_optimizer(phi, xi, args.weight_decay, compact=args.compact_states, seed=args.seed)
    opt_a = torch.optim.Adam(a if isinstance(a, list) else [a], lr=args.meta_lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if start:
        start = load_checkpoint(args.out, model, a, opt_phi, opt_a)
        # Metrics logged after the checkpoint are replayed by this run: drop them.
        kept = [o for _, o in prm.iter_jsonl(metrics_path, True)] if os.path.isfile(metrics_path) else []
        with open(metrics_path, "w") as f:
            for o in kept:
                if o["iteration"] <= start:
                    f.write(json.dumps(o) + "\n")
        print(f"resumed {args.out} at iteration {start}")
    else:
        open(metrics_path, "w").close()

    def batch_alpha_keys(idx, records):
        if instance:
            return torch.tensor(idx, device=device)
        return torch.tensor([dom_index[r["domain"]] for r in records], device=device)

    def weights_of_all():
        """alpha_b of every training CoT (N,), instance weights normalised to mean 1 over all of them
        (instance-net: one no-grad pass over the data)."""
        if args.weighting != "instance-net":
            keys = batch_alpha_keys(list(range(len(train))), train)
            return cot_weights(detached(a), keys, args.weighting, w_max=args.weight_max)
        out = []
        with torch.no_grad():
            for i in range(0, len(train), args.train_batch):
                values, mask = forward(model, train[i:i + args.train_batch], autocast)
                p, p_mask = label_tensors(train[i:i + args.train_batch], values.shape[1], device)
                out.append(instance_weights(detached(a), None, args.weighting, (values.float(), p, mask & p_mask),
                                            args.weight_max))
        w = torch.cat(out)
        return w / w.mean()

    def current_alpha(w=None):
        """Per domain: its weight, or the mean weight of its CoTs in the instance modes."""
        if args.weighting == "domain":
            w = domain_weights(a.detach())
            return {d: w[k].item() for k, d in enumerate(domains)}
        if instance:
            w = weights_of_all() if w is None else w
            keys = torch.tensor([dom_index[r["domain"]] for r in train], device=device)
            return {d: w[keys == k].mean().item() for k, d in enumerate(domains)}
        return {d: 1.0 for d in domains}

    def report(alpha):
        """Instance weights (safetensors, with the record keys) and, in the toy world, their AUC
        for telling clean-key CoTs from corrupted-key ones."""
        w = weights_of_all()
        out = {}
        if instance:
            alpha.update(current_alpha(w))
            prm.save_tensors_atomic(os.path.join(args.out, "instance_weights.safetensors"), {"weights": w},
                                    metadata={"keys": json.dumps([prm.record_key(r) for r in train])})
        out.update({f"auc/{k}": v for k, v in key_auc(w.tolist(), train).items()})
        return out

    history = [o for _, o in prm.iter_jsonl(metrics_path, True)]
    history = [{"iteration": o["iteration"], "alpha": {d: o[f"alpha/{d}"] for d in domains}} for o in history]
    bar = tqdm(range(start, args.iterations), initial=start, total=args.iterations, desc="bilevel", dynamic_ncols=True)
    sums = dict(lower=0.0, weighted=0.0, upper=0.0, n=0)
    for it in bar:
        t0 = time.perf_counter()
        for u in range(args.unroll_steps):
            idx = sample(len(train), args.train_batch, args.seed, "train", it, u)
            records = [train[i] for i in idx]
            batch = lower_step(model, opt_phi, a, records, batch_alpha_keys(idx, records), args.weighting, autocast,
                               args.weight_max)
            if not torch.isfinite(batch.L_tr):
                raise Diverged(f"non-finite lower loss at iteration {it}")
            sums["lower"] += (batch.l.sum() / batch.n.sum().clamp(min=1)).item()
            sums["weighted"] += batch.L_tr.item()
        L_meta = float("nan")
        if args.weighting != "fixed" and it >= args.cold_start:
            m_records = [meta[i] for i in sample(len(meta), args.meta_batch, args.seed, "meta", it)]
            if instance:       # the weights of a fresh sample of training CoTs move, not only the last batch's
                idx = sample(len(train), args.instance_batch, args.seed, "instance", it)
                batch = label_batch([train[i] for i in idx], batch_alpha_keys(idx, None), device)
            L_meta = upper_step(model, phi, a, opt_a, batch, m_records, xi, args, autocast)
            if not math.isfinite(L_meta):
                raise Diverged(f"non-finite upper loss at iteration {it}")
        sums["upper"] += 0.0 if math.isnan(L_meta) else L_meta
        sums["n"] += 1
        seconds = time.perf_counter() - t0
        done = it + 1
        logging = done % args.log_every == 0 or done == args.iterations
        if args.weighting == "domain" or logging:
            alpha = current_alpha() if not instance else {}
            extra = report(alpha) if logging else {}                     # instance modes fill alpha here
            bar.set_postfix_str(" ".join(f"{d}={w:.2f}" for d, w in list(alpha.items())[:6]))
        if logging:
            k = sums["n"]
            row = {"iteration": done, "lower/loss": sums["lower"] / (k * args.unroll_steps),
                   "lower/weighted_loss": sums["weighted"] / (k * args.unroll_steps),
                   "upper/loss": sums["upper"] / k if args.weighting != "fixed" else None,
                   "time/seconds_per_iteration": seconds}
            row.update({f"alpha/{d}": w for d, w in alpha.items()})
            row.update(extra)
            if any(k.startswith("auc/") for k in row):
                tqdm.write(f"iteration {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                             if k.startswith(("auc/", "alpha/"))))
            with open(metrics_path, "a") as f:
                prm.append_jsonl(f, row)
            history.append({"iteration": done, "alpha": alpha})
            write_weights(args.out, alpha, args.weighting, history)
            sums = dict(lower=0.0, weighted=0.0, upper=0.0, n=0)
        if done % args.save_every == 0 or done == args.iterations:
            save_checkpoint(args.out, model, a, opt_phi, opt_a, done)
    bar.close()

    alpha = current_alpha()
    card = [f"- DreamPRM bi-level training (weighting: {args.weighting}), {args.iterations} outer iterations of "
            f"{args.unroll_steps} lower steps; lower lr {xi}, meta lr {args.meta_lr}, precision {args.precision}",
            f"- training CoTs: {len(train)} (" + ", ".join(f"{d} {sum(r['domain'] == d for r in train)}"
                                                       for d in domains) + f"); meta CoTs: {len(meta)}",
            f"- skipped as longer than {model.max_length} tokens: {long_train} training, {long_meta} meta CoTs",
            "- learned domain weights: " + ", ".join(f"{d} {w:.3f}" for d, w in sorted(alpha.items(), key=lambda x: -x[1]))]
    model.save_pretrained(os.path.join(args.out, "prm"), card)
    write_weights(args.out, alpha, args.weighting, history)
    plot_weights(history, domains, os.path.join(args.out, "domain_weights.png"))
    toy = args.train == [TOY_TRAIN] and all(d in gen_cots.TOY_DOMAINS for d in alpha)
    what = "mean instance weight per domain" if instance else "learned domain weights (alpha)"
    print(what + (" next to each toy domain's true quality (3 best):" if toy else ":"))
    for d, w in sorted(alpha.items(), key=lambda x: -x[1]):
        print(f"  {d:24s} {w:.3f}" + (f"   quality {gen_cots.TOY_DOMAINS[d]['quality']}" if toy else ""))
    aucs = key_auc(weights_of_all().tolist(), train)
    if aucs:
        print("AUC of the weights, clean-key against corrupted-key CoTs: "
              + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()))
    print(f"PRM saved to {os.path.join(args.out, 'prm')}")
    baseline = args.out.rstrip("/") + "-vanilla"
    if toy_demo and args.weighting == "domain" and not args.no_baseline and \
            not os.path.isdir(os.path.join(baseline, "prm")):
        print(f"training the vanilla PRM baseline (uniform weights) into {baseline} for rerank.py")
        resume = os.path.isfile(os.path.join(baseline, "checkpoint", "state.json"))
        return main(baseline_argv(argv, baseline, resume))
    return 0


def cli(argv=None):
    try:
        return prm.run_cli(main, argv)
    except Diverged as e:
        print(f"error: {e}; stopped, the last good checkpoint is kept (resume with --resume after "
              f"lowering --lr)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
