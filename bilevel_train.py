"""DreamPRM bi-level training: fit the PRM on domain-weighted step labels (lower level) while
learning the domain weights from the aggregation-function loss on a clean meta set (upper level).

Reads   --train labels.jsonl [more]  (step labels in any format of README 'Data formats')
        --meta  cots.jsonl           (whole CoTs with `correct`, or the published meta.json)
Writes  --out RUN_DIR: prm/ (load with prm.PRM.from_pretrained(RUN_DIR)), domain_weights.json,
        domain_weights.png, metrics.jsonl, eval.jsonl (with --eval), instance_weights.safetensors
        (instance modes), config.json, checkpoint/ (resume with --resume)

The math (symbols as in the paper; the README's "The math" explains each):
  alpha_k = softplus(a_k) / mean_j softplus(a_j)                             domain weights
  L_tr(phi, alpha) = sum_b alpha_d(b) sum_i (V_phi(x_b, yhat_bi) - p_bi)^2 / sum_b n_b
                   = sum_b w_b(alpha) l_b(phi)                               lower loss
  L_meta(phi) = mean_m (A(V_phi(x_m, yhat_m1..n)) - r_m)^2                   upper loss
  every U lower steps (AdamW on phi, lr xi), one upper step (Adam on a, meta lr) with
  v = grad_phi L_meta(phi),  eps = r / ||v||
  g_a = -xi [grad_a L_tr(phi + eps v, alpha) - grad_a L_tr(phi - eps v, alpha)] / (2 eps)

Read the method top-down: (1) the lower level: weights, L_tr and one lower step; (2) the upper
level: L_meta, the hypergradient and one upper step; (3) the training loop (`bilevel`, with the lr
schedule and batch draws it calls; `main`, at the end, runs it for the flags). The variants sit
behind seams chosen once before the loop and named above it: the forward (PackedForward, or
SharedPrefixForward), the weighting (DreamPRM's DomainWeighting, or one picked by
`make_weighting`) and the upper level's meta loss and restore copy (`Upper`). Appendices after the
method: A the other weightings (fixed, DreamPRM-1.5's instance weights) and the choice among them,
B data, C the run configuration (every flag: its default, presets and help), D the run directory
(setup, the end of an iteration, checkpoints), E the upper loss's ablations, the restore copy,
optimizers and memory, F shared-prefix training, G more than one process (torchrun, FSDP2).

Run the toy demo (no data arguments: the toy world is built first when toy/ is missing; --synthetic
trains on a small text-only set instead):
    python bilevel_train.py
Real data:
    python bilevel_train.py --train labels.jsonl --meta meta.jsonl --domains ai2d,m3cot \\
        --model /models/Qwen2-VL-2B-Instruct --precision bf16 --grad-checkpointing --offload-restore \\
        --out runs/dreamprm
  (fp32 master weights, bf16 compute: 16 bytes per parameter before activations, about 33 GiB for
  a 2B PRM; --compact-states and --freeze-vision take it under 20 GiB; README, Memory)
On N GPUs, the same flags (the PRM sharded with FSDP2; README, More than one GPU):
    torchrun --nproc-per-node N bilevel_train.py --train labels.jsonl --meta meta.jsonl ...
"""

import bisect
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

import prm


TOY_TRAIN = "toy/train_labels.jsonl"   # written by the toy pipeline (gen_cots.py --toy, mc_label.py)
TOY_META = "toy/meta_cots.jsonl"
# Every flag, with its default, its presets and its help: Appendix C.


# ==============================================================================================
# 1. The lower level: domain weights, step labels, the loss L_tr, one lower step
# ==============================================================================================

def domain_weights(a):
    """alpha = softplus(a) / mean(softplus(a)): positive, mean 1, a = 0 gives uniform weights. (K,) -> (K,)"""
    s = F.softplus(a)
    return s / s.mean()


class Weighting:
    """How the training CoTs are weighted (DreamPRM's: DomainWeighting; the variants: Appendix A).
    a: the raw weights, a list of tensors with requires_grad (the upper level's parameters);
    keys (N, ...): each training CoT's index into a (for DreamPRM, its domain)."""
    moves = True            # False: the weights stay fixed, no upper level
    per_cot = False         # True: one weight per training CoT (written to instance_weights.safetensors)
    reads_values = False    # True: the weights read the batch's step values (no --grad-accum)

    def __init__(self, a, keys):
        self.a, self.keys = a, keys

    def weights(self, a, batch):
        """(B,) each CoT's weight at raw weights a; w_b(a) of L_tr is it divided by sum_b n_b."""
        raise NotImplementedError

    def upper_batch(self, it, latest):
        """The train batch the hypergradient goes through: the latest lower batch."""
        return latest

    def of_all(self):                                   # for the logs: (N,) every training CoT's weight
        return self.weights([x.detach() for x in self.a], SimpleNamespace(keys=self.keys))

    def per_domain(self, w_all, train, domains):        # for the logs: {domain: its CoTs' mean weight}
        of = domain_keys(train, domains, w_all.device)
        return {d: w_all[of == k].mean().item() for k, d in enumerate(domains)}


class DomainWeighting(Weighting):
    """DreamPRM: one raw weight a_k per domain; a CoT's weight is its domain's alpha."""

    def weights(self, a, batch):
        return domain_weights(a[0])[batch.keys]                         # (B,) alpha_d(b)

    def per_domain(self, w_all, train, domains):
        alpha = domain_weights(self.a[0].detach())                      # (K,)
        return {d: alpha[k].item() for k, d in enumerate(domains)}


class PackedForward:
    """The PRM as the method calls it: forward(records) -> (B, S) values V_phi(x_b, yhat_bi) and (B, S)
    mask, one packed forward (prm.step_values). Appendix F's SharedPrefixForward is the other."""

    def __init__(self, model, autocast):
        self.model, self.autocast = model, autocast

    def __call__(self, records):
        encoded = [self.model.encode(r, cache=True) for r in records]
        with self.autocast:
            return prm.step_values(self.model, encoded)

    # One process: every CoT is its share (in `pieces` micro-batches), its sums the batch's (Appendix G's splits).
    def share(self, n, pieces):
        return torch.arange(n).chunk(pieces)

    def sum(self, x):
        return x

    def backward(self, loss):
        loss.backward()

    def norm(self, v):                          # ||v||_2 of a list of tensors, one device sync
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in v])).item()


@dataclass
class TrainBatch:
    """A lower batch: CoTs and MC labels; the lower step adds its losses, the hypergradient re-evaluates l_b."""
    records: list
    keys: torch.Tensor              # (B, ...) index into a of each CoT (its domain)
    p: torch.Tensor                 # (B, S) MC labels p_bi
    p_mask: torch.Tensor            # (B, S) labelled steps
    n: torch.Tensor                 # (B,) n_b, labelled steps per CoT
    l: torch.Tensor = None          # (B,) per-CoT losses l_b (after the lower step)
    L_tr: torch.Tensor = None       # the weighted loss (scalar, detached; after the lower step)


def train_batch(records, keys, device):
    """The TrainBatch of some training records: their labels, before any forward."""
    p, p_mask = label_tensors(records, max(len(r["mc"]) for r in records), device)        # (B, S)
    return TrainBatch(records, keys, p, p_mask, p_mask.sum(-1).float())


def label_tensors(records, S, device, dtype=torch.float32):
    """MC labels (B, S) and which steps are labelled (B, S)."""
    p, _ = prm.pad_rows([[0.0 if x is None else x for x in r["mc"]] for r in records], 0.0, S, dtype)
    p_mask, _ = prm.pad_rows([[x is not None for x in r["mc"]] for r in records], False, S, torch.bool)
    return p.to(device), p_mask.to(device)


def step_losses(values, mask, p, p_mask):
    """l_b = sum_i (V_bi - p_bi)^2 over labelled steps, and n_b: (B, S) values, mask, labels p and
    labelled steps p_mask -> l (B,), n (B,)."""
    m = (mask & p_mask).to(values.dtype)
    return ((values - p) ** 2 * m).sum(-1), m.sum(-1)


def at_least_fp32(values):
    """Step values for a loss: bf16 (autocast) to fp32; fp32 and fp64 as they are."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


def batch_losses(forward, batch, mine):
    """l_b (b,) of the CoTs `mine` (indices) of a train batch at the current phi, with autograd unless
    the caller turns it off."""
    values, mask = forward([batch.records[i] for i in mine.tolist()])                 # (b, S)
    S = values.shape[1]
    return step_losses(at_least_fp32(values), mask, batch.p[mine, :S], batch.p_mask[mine, :S])[0]


def lower_loss(alpha_b, l, n_total):
    """L_tr = sum_b alpha_b l_b / sum_b n_b (each labelled step counts once): alpha_b (B,), l (B,)."""
    return (alpha_b * l).sum() / n_total


def lower_step(forward, opt_phi, weighting, batch, accum, clip):
    """phi <- AdamW step on L_tr(phi, alpha), alpha fixed, in `accum` micro-batches (--grad-accum,
    as nanoGPT: gradients summed, 1/accum of the activations), the gradient's norm clipped to `clip`
    (inf: not at all). A non-finite L_tr stops the run (Diverged) before the step."""
    alpha_b = weighting.weights([x.detach() for x in weighting.a], batch)         # (B,) alpha fixed
    n_total = batch.n.sum().clamp(min=1)                                          # sum_b n_b
    L_tr, l_all = 0.0, torch.zeros_like(batch.n)                                 # (B,) l_b of every CoT
    for chunk in forward.share(len(batch.records), accum):                        # this process's CoTs
        l = batch_losses(forward, batch, chunk)                                   # (b,)
        loss = lower_loss(alpha_b[chunk], l, n_total)           # the micro-batch's share of L_tr
        if not torch.isfinite(loss):
            raise Diverged(f"the lower loss L_tr is {loss.item()}", "lower")
        forward.backward(loss)
        L_tr, l_all[chunk] = L_tr + loss.detach(), l.detach()
    torch.nn.utils.clip_grad_norm_([p for g in opt_phi.param_groups for p in g["params"] if p.grad is not None], clip)
    opt_phi.step()
    opt_phi.zero_grad(set_to_none=True)         # spent: the hypergradient needs the memory
    batch.L_tr, batch.l = forward.sum(L_tr), forward.sum(l_all)
    return batch


# ==============================================================================================
# 2. The upper level: the meta loss L_meta, the hypergradient (finite difference, as DARTS and
#    Betty's "darts" method), one upper step
# ==============================================================================================

def meta_loss(values, mask, records):
    """L_meta = mean_m (A(V_m1..n) - r_m)^2 on (M, S) values and mask of whole meta CoTs, A =
    prm.mean_logit, r_m their correctness, as published (ablations: Appendix E)."""
    r = torch.tensor([float(x["correct"]) for x in records], device=values.device)    # (M,)
    A = prm.mean_logit(values, mask)                                                 # (M,)
    return ((A - r) ** 2).mean()


class Upper:
    """The upper level's constants, built once (as DARTS's Architect): forward, phi, the weighting, Adam on
    its a, the radius r, the restore copy copy_phi (beside phi, or in CPU memory), meta_loss (or an ablation)."""

    def __init__(self, forward, phi, weighting, opt_a, r, copy_phi, loss):
        self.forward, self.phi, self.weighting, self.opt_a = forward, phi, weighting, opt_a
        self.r, self.copy_phi, self.meta_loss = r, copy_phi, loss


def hypergradient(upper, L_meta, batch, xi):
    """g_a = -xi [grad_a L_tr(phi + eps v, a) - grad_a L_tr(phi - eps v, a)] / (2 eps), v = grad_phi L_meta,
    eps = r / ||v||. a enters L_tr only through w_b(a), so grad_a L_tr(phi +- eps v) = sum_b l_b(phi +- eps v)
    grad_a w_b: two forwards on `batch`, no backward through the network. phi is restored bit for bit."""
    upper.forward.backward(L_meta)                              # v = grad_phi L_meta(phi), left in p.grad
    phi = [p for p in upper.phi if p.grad is not None]          # None: not reached by the meta batch
    v = [p.grad for p in phi]
    for p in phi:
        p.grad = None
    norm = upper.forward.norm(v) if v else 0.0                  # ||v||_2
    if norm == 0:
        return [torch.zeros_like(x) for x in upper.weighting.a]
    eps, saved, mine = upper.r / norm, upper.copy_phi(phi), upper.forward.share(len(batch.records), 1)[0]
    with torch.no_grad():
        for p, g in zip(phi, v):
            p.add_(g, alpha=eps)                                # phi + eps v
        l_plus = batch_losses(upper.forward, batch, mine)       # (b,) this process's CoTs
        for p, s, g in zip(phi, saved, v):
            p.copy_(s).add_(g, alpha=-eps)                      # phi - eps v
        l_minus = batch_losses(upper.forward, batch, mine)
        for p, s in zip(phi, saved):
            p.copy_(s)                                          # phi, bit for bit
    w = upper.weighting.weights(upper.weighting.a, batch)[mine] / batch.n.sum().clamp(min=1)    # (b,) w_b(a)
    s = ((l_plus - l_minus).detach().to(w.dtype) * w).sum() / (2 * eps)
    return [-xi * upper.forward.sum(g) for g in torch.autograd.grad(s, upper.weighting.a)]


def upper_step(upper, batch, meta_records, xi):
    """a <- Adam step on g_a of L_meta (meta_records) through L_tr (batch). Returns L_meta; a non-finite
    L_meta or g_a stops the run (Diverged) before the step."""
    mine = [meta_records[i] for i in upper.forward.share(len(meta_records), 1)[0].tolist()]   # this process's
    values, mask = upper.forward(mine)                                    # (M, S)
    L_meta = upper.meta_loss(at_least_fp32(values), mask, mine) * (len(mine) / len(meta_records))   # its share
    g_a, L_meta = hypergradient(upper, L_meta, batch, xi), upper.forward.sum(L_meta.detach()).item()
    if not math.isfinite(L_meta):
        raise Diverged(f"the upper loss L_meta is {L_meta}", "upper")
    if not all(torch.isfinite(g).all() for g in g_a):
        raise Diverged(f"the hypergradient holds non-finite values (L_meta {L_meta:.4g})", "upper")
    upper.opt_a.zero_grad(set_to_none=True)
    for x, g in zip(upper.weighting.a, g_a):
        x.grad = g
    upper.opt_a.step()
    return L_meta


# ==============================================================================================
# 3. The training loop, with the lr schedule and the batch draws it calls
# ==============================================================================================

def get_xi(t, args):
    """xi at lower step t (0-based), as nanoGPT's get_lr: a linear --warmup, then --lr times the decay of
    --lr-schedule: constant (the default: 1), cosine (to 0 at the last step) or step (x --lr-gamma every
    --lr-step). A pure function of t, so a resumed run follows it."""
    total = args.iterations * args.unroll_steps
    w = int(args.warmup * total)
    if t < w:
        return args.lr * ((t + 1) / w)
    return args.lr * {"constant": 1, "cosine": 0.5 * (1 + math.cos(math.pi * (t - w) / max(1, total - w))),
                      "step": args.lr_gamma ** (t // args.lr_step)}[args.lr_schedule]


def draw(groups, k, seed, *key):
    """k record indices, a pure function of (seed, key) (a resumed run draws the same): groups drawn
    uniformly with replacement, each bringing all its indices, until k (the last cut short). A group is
    one CoT, or with --group-by-question one question's CoTs (question_groups)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((seed,) + key).encode()))
    out = []
    while len(out) < k:
        out += groups[int(torch.randint(len(groups), (1,), generator=g))][:k - len(out)]
    return out


def bilevel(args):
    """One bi-level training run: the PRM phi and the raw weights a, trained as the flags ask."""
    with open_run(args) as run:       # Appendix D: lock --out, data, PRM, seams, resume; on leaving, save the PRM
        # The seams, each chosen once by the flags (setup_run, Appendix D):
        forward = run.forward         # PackedForward (section 1), SharedPrefixForward (--group-by-question), ShardedForward (torchrun)
        weighting = run.weighting     # DreamPRM's DomainWeighting (section 1), or --weighting's (Appendix A)
        upper = run.upper             # section 2's Upper: phi, Adam on a, r, the restore copy, the meta loss
        U, device = args.unroll_steps, run.device
        for it in run.bar:                                          # range(start, iterations), with a bar
            t0, batches, L_meta = time.perf_counter(), [], None
            # U lower steps: phi <- AdamW(grad_phi L_tr(phi, alpha)), alpha fixed, lr xi.
            for u in range(U):
                xi = get_xi(it * U + u, args)
                for group in run.opt_phi.param_groups:
                    group["lr"] = xi
                idx = draw(run.train_groups, args.train_batch, args.seed, "train", it, u)
                batch = train_batch([run.train[i] for i in idx], weighting.keys[idx], device)
                batches.append(lower_step(forward, run.opt_phi, weighting, batch, args.grad_accum, run.clip))
            # One upper step after the cold start: a <- Adam(g_a), the hypergradient through a train batch.
            if weighting.moves and it >= args.cold_start:
                m_idx = draw(run.meta_groups, args.meta_batch, args.seed, "meta", it)
                L_meta = upper_step(upper, weighting.upper_batch(it, batches[-1]), [run.meta[i] for i in m_idx], xi)
            # Logs, held-out figures and checkpoints, each at its own period (Appendix D).
            end_of_iteration(run, it + 1, batches, L_meta, time.perf_counter() - t0)


# ==============================================================================================
# Appendix A. Instance weights (DreamPRM-1.5): --weighting instance-table, instance-net
# The method ends above. The appendices hold what a run needs around it.
# ==============================================================================================

def bounded(x, w_max):
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


def domain_keys(train, domains, device):
    """(N,) the index of each training CoT's domain."""
    index = {d: k for k, d in enumerate(domains)}
    return torch.tensor([index[r["domain"]] for r in train], device=device)


def domain_weighting(train, domains, device):
    """DreamPRM's weighting: a = 0 (uniform alpha), keyed by domain."""
    return DomainWeighting([torch.zeros(len(domains), device=device, requires_grad=True)],     # (K,)
                           domain_keys(train, domains, device))


def make_weighting(args, train, domains, device, forward):
    """The one place the weighting is chosen: DreamPRM's (section 1), fixed weights, or one of
    DreamPRM-1.5's instance weightings, every weight starting at 1."""
    if args.weighting == "domain":
        return domain_weighting(train, domains, device)
    domain, cot = domain_keys(train, domains, device), torch.arange(len(train), device=device)       # (N,), (N,)
    zeros = lambda n: torch.zeros(n, device=device, requires_grad=True)                            # noqa: E731
    if args.weighting == "fixed":
        return FixedWeighting([zeros(len(domains))], domain)
    keys = torch.stack([cot, domain], 1) if args.weighting == "domain-instance" else cot           # (N, 2) or (N,)
    fresh = partial(instance_batch, train, question_groups(train, False), keys, args.instance_batch, args.seed,
                    device=device)
    if args.weighting == "instance-table":
        return InstanceTable([zeros(len(train))], keys, args.weight_max, fresh)
    if args.weighting == "instance-net":
        return InstanceNet(init_instance_net(args.net_hidden, args.seed, device), keys, args.weight_max, fresh,
                           forward, train, args.train_batch)
    return DomainInstance([zeros(len(domains)), zeros(len(train))], keys, args.weight_max, fresh)


class FixedWeighting(Weighting):
    """--weighting fixed: every CoT weighs 1 and no upper step runs (the vanilla PRM)."""
    moves = False

    def weights(self, a, batch):
        return torch.ones(len(batch.keys), dtype=a[0].dtype, device=a[0].device)

    def per_domain(self, w_all, train, domains):
        return {d: 1.0 for d in domains}


class InstanceWeighting(Weighting):
    """One weight per training CoT (DreamPRM-1.5), bounded in (0, w_max) and divided by the batch's
    mean. Dividing by the mean, as domain weights are normalised, keeps only the relative weights: a
    common drift of all weights (up or down) would otherwise act as a second, uncontrolled learning
    rate of the lower level (seen on the toy world: the net drove every weight to 0, the table
    every weight up). An upper step moves the weights of a fresh sample of training CoTs (fresh(it)),
    not only those of the latest lower batch."""
    per_cot = True

    def __init__(self, a, keys, w_max, fresh):
        super().__init__(a, keys)
        self.w_max, self.fresh = w_max, fresh

    def weights(self, a, batch):
        w = self.bounded_weights(a, batch)                                  # (B,)
        return w / w.mean()

    def upper_batch(self, it, latest):
        return self.fresh(it=it)


class InstanceTable(InstanceWeighting):
    """--weighting instance-table: a raw weight per training CoT; keys (N,): each CoT's own index."""

    def bounded_weights(self, a, batch):
        return bounded(a[0][batch.keys], self.w_max)


class InstanceNet(InstanceWeighting):
    """--weighting instance-net: the Instance Net's output on a CoT's step values and labels. It
    reads the values a ValuedBatch carries, else runs a no-grad forward of its own at the current
    phi (one more forward per lower step than the other weightings)."""
    reads_values = True

    def __init__(self, a, keys, w_max, fresh, forward, train, batch_size):
        super().__init__(a, keys, w_max, fresh)
        self.forward, self.train, self.batch_size = forward, train, batch_size

    def bounded_weights(self, a, batch):
        if getattr(batch, "values", None) is None:
            with torch.no_grad():
                values, mask = self.forward(batch.records)                      # (B, S) at the current phi
            batch = ValuedBatch(**vars(batch), values=values.float(), mask=mask)
        return bounded(instance_net(a, batch.values, batch.p, batch.mask & batch.p_mask), self.w_max)

    def of_all(self):
        """One no-grad pass over the training CoTs, the weights normalised over all of them."""
        w = torch.cat([self.bounded_weights([x.detach() for x in self.a],
                                            train_batch(self.train[i:i + self.batch_size], None, self.keys.device))
                       for i in range(0, len(self.train), self.batch_size)])                 # (N,)
        return w / w.mean()


@dataclass
class ValuedBatch(TrainBatch):
    """A TrainBatch with its step values at the current phi: what the Instance Net reads."""
    values: torch.Tensor = None     # (B, S) step values, detached
    mask: torch.Tensor = None       # (B, S) their mask


class DomainInstance(InstanceWeighting):
    """--weighting domain-instance: w_b = alpha_d(b) x u_b, with alpha the domain weights of DreamPRM
    and u_b a CoT's bounded table weight divided by the mean u of the batch's CoTs of its domain, so
    the domain weight alone sets a domain's share and the instance weights only rank CoTs inside it.
    a = [a (K,), table (N,)]; keys (N, 2): CoT and domain index."""

    def weights(self, a, batch):
        cot, dom = batch.keys[:, 0], batch.keys[:, 1]
        alpha = domain_weights(a[0])[dom]                                                  # (B,)
        u = bounded(a[1][cot], self.w_max)                                                 # (B,)
        total = torch.zeros_like(a[0]).index_add(0, dom, u)                                # (K,) per domain
        count = torch.zeros_like(a[0]).index_add(0, dom, torch.ones_like(u))
        return alpha * u / (total / count.clamp(min=1))[dom]


# Each --weighting's class: what the flag checks and presets ask of a weighting (moves, per_cot,
# reads_values) before make_weighting builds it.
KINDS = {"domain": DomainWeighting, "fixed": FixedWeighting, "instance-table": InstanceTable,
         "instance-net": InstanceNet, "domain-instance": DomainInstance}


def instance_batch(train, each, keys, size, seed, it, device):
    """A fresh sample of training CoTs (each: one group per CoT, for draw) for an instance-mode upper
    step: their weights move, not only those of the latest lower batch."""
    idx = draw(each, size, seed, "instance", it)
    return train_batch([train[i] for i in idx], keys[idx], device)


def save_instance_weights(run_dir, w, train):
    """instance_weights.safetensors: the weight of every training CoT, with the record keys."""
    prm.save_tensors_atomic(os.path.join(run_dir, "instance_weights.safetensors"), {"weights": w},
                            metadata={"keys": json.dumps([prm.record_key(r) for r in train])})


def auc(scores, positive):
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney); None if a class is empty."""
    pos = [s for s, y in zip(scores, positive) if y]
    neg = sorted(s for s, y in zip(scores, positive) if not y)
    if not pos or not neg:
        return None
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


# ==============================================================================================
# Appendix B. Data: the toy world, reading and checking the inputs, label tensors, batches
# ==============================================================================================

def synthetic_data(seed, n_per_domain=48, n_meta=32):
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
    """gen_cots.py --toy, then MC labels for the training CoTs and (for rerank.py's step report) the
    test CoTs: the two earlier stages, run here for the demo (imported here, not at the top, so that
    training on given data imports no other stage)."""
    import gen_cots
    import mc_label
    print(f"building the toy world (seed {seed}): gen_cots.py --toy, then mc_label.py")
    gen_cots.main(["--toy", "--seed", str(seed)])
    for name in ("train", "test"):
        mc_label.main(["--cots", os.path.join(prm.TOY_DIR, f"{name}_cots.jsonl"), "--seed", str(seed)])


def toy_quality(args, domains):
    """{domain: true quality} when the run trains on the toy world's data, else None."""
    import gen_cots
    toy = args.train == [TOY_TRAIN] and all(d in gen_cots.TOY_DOMAINS for d in domains)
    return {d: gen_cots.TOY_DOMAINS[d]["quality"] for d in domains} if toy else None


def read_inputs(args):
    """Train and meta records from the files given (every format of prm.read_cots), with a line
    per file on what was read and skipped. Duplicate records within or across --train files are
    an error."""
    train, train_skips = [], []
    for path in args.train:
        recs, skips = prm.read_cots(path, "labels", **prm.reading(args))
        print(f"{path}: {len(recs)} training CoTs" + (f" ({recs[0]['_format']} format)" if recs else "")
              + (f"; {prm.skip_report(skips, [r['id'] for r in recs])}" if skips else ""))
        train += recs
        train_skips += skips
    prm.check_unique(train, prm.record_key, "record key (question, image and steps, or id and sample)")
    if not args.meta:                                          # vanilla training has no upper level
        train.sort(key=prm.record_key)
        return train, [], {s.domain for s in train_skips}
    meta, skips = prm.read_cots(args.meta, "cots", **prm.reading(args))
    report = prm.skip_report(skips, [r["id"] for r in meta])                # '' when nothing was skipped
    print(f"{args.meta}: {len(meta)} meta CoTs" + (f"; {report}" if report else ""))
    # Sorted by key: the run depends on the set of records, not on the order a concurrent stage wrote them.
    train.sort(key=prm.record_key)
    meta.sort(key=prm.record_key)
    if not meta:
        raise prm.DataError("no usable meta records: " + (report or "the file is empty"), file=args.meta)
    return train, meta, {s.domain for s in train_skips}


def check_meta(meta, train, args):
    """A meta set must teach something: both correct and incorrect CoTs (else the upper loss has one
    target and cannot tell domains apart), and no question that is also in the training data."""
    if KINDS[args.weighting].moves and len({r["correct"] for r in meta}) < 2:
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
        if not (os.path.isfile(TOY_TRAIN) and os.path.isfile(TOY_META)) and prm.processes()[0] == 0:
            build_toy_world(args.seed)
        prm.barrier()                                          # under torchrun, process 0 builds it
        args.train, args.meta = [TOY_TRAIN], TOY_META
    if not args.train or not (args.meta or not KINDS[args.weighting].moves):
        raise prm.DataError("give both --train and --meta (or neither, for the toy demo; vanilla training, "
                            "--weighting fixed, needs no --meta)")
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
    kept = [r for r in prm.progress(records, desc=f"lengths ({what})", leave=False)
            if model.fits(model.encode(r, cache=True))]
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


def meta_targets(records, S, device, dtype=torch.float32):
    """For the w/o-AFL ablation: meta MC labels where present, else the last step against r."""
    return label_tensors([r if r.get("mc") else dict(r, mc=[None] * (len(r["steps"]) - 1) + [float(r["correct"])])
                          for r in records], S, device, dtype)


# ==============================================================================================
# Appendix C. The run configuration: every flag with its default, presets and help
# ==============================================================================================

# Each dataclass is one group of flags, and each field one flag: its default (for real data), its
# one-line help, and the presets that change its default. A preset applies when (first wins):
#   "--recipe R"   the published recipes: the official DreamPRM code steps the lower lr down by half
#                  every 5000 steps (the step schedule's defaults) with weight decay 1e-3 on the raw
#                  weights; DreamPRM-1.5 uses a cosine schedule with 5% warm-up, gradients clipped at 1.0
#   "instance-table", "instance-net", "domain-instance", "instance modes", "toy instance modes"
#                  DreamPRM-1.5's recipe for instance weights: one lower step per upper step and a
#                  meta lr at which a weight moves within the few upper steps that reach it (a table
#                  entry moves only when its CoT is drawn, the net's parameters at every upper step:
#                  on the toy world 0.1 drove the net to saturated weights within 50 upper steps,
#                  0.003 and 0.01 gave the same ranking); the toy adds a cold start (the PRM learns
#                  the task before its judgement of instances counts) and the domain demo's 750
#                  lower steps
#   "toy"          no data flags: a tiny PRM learns in minutes, and larger meta batches keep the
#                  hypergradient's noise below its signal
#   "--model tiny" on real data: the tiny backbone learns at the toy's rate
RECIPES = ("dreamprm", "dreamprm-1.5")
WEIGHTINGS = ("domain", "fixed", "instance-table", "instance-net", "instance", "domain-instance")


@dataclass
class Data:
    """Data"""
    train: list = prm.option([], "training labels, one or more files in any of the formats of README 'Data formats' "
                             f"({', '.join(prm.FORMATS)})", nargs="*")
    meta: str = prm.option(None, "meta CoTs with correctness: our cots.jsonl or published meta.json")
    domains: str = prm.option(None, "comma-separated training domains (default: every domain with usable records)")
    image_root: str = prm.option(None, "folder image paths are relative to (default: each file's folder)")
    allow_overlap: bool = prm.option(False, "allow meta questions that are also in the training data (same text "
                                     "and image)")
    allow_one_class_meta: bool = prm.option(False, "run even when every meta CoT is correct (or every one "
                                            "incorrect), with a warning")
    synthetic: bool = prm.option(False, "with no data: a small synthetic set instead of the toy world")
    eval: str = prm.option(None, "a held-out labelled split (CoTs with step labels and correctness, any format): "
                           "step AUC, step accuracy at 0.5 and best of N on it at every --eval-every iterations")


@dataclass
class Reading:
    """Reading a CoT (stored with the PRM, so scoring reads CoTs alike)"""
    final_answer: str = prm.option("auto", "the final answer line: joins the last step (last-step) or is never "
                                   "encoded (drop), for train, meta and test alike (auto: drop for published DreamPRM "
                                   "data, else last-step)", choices=("auto",) + prm.FINAL_RULES)
    max_side: int = prm.option(None, "images shrink until their longest side is at most this many pixels, before the "
                               "family's processor (0: never; default: the family's, README 'Backbones': 512 for Qwen "
                               "and LLaVA-OneVision, where it bounds the image tokens, else none)",
                               type=prm.number(int, 0, 1 << 16))
    min_pixels: int = prm.option(None, "image processor's minimum pixels (default: the processor's own)",
                                 type=prm.number(int, 1, 10 ** 9))
    max_pixels: int = prm.option(None, "image processor's maximum pixels (default: the processor's own)",
                                 type=prm.number(int, 1, 10 ** 9))
    max_length: int = prm.option(None, "longest CoT in tokens; longer ones are skipped and counted (default: the "
                                 "backbone's positions)", type=prm.number(int, 1))


@dataclass
class Method:
    """The bi-level method"""
    model: str = prm.option("tiny", "backbone directory (save_pretrained format), or 'tiny'")
    weighting: str = prm.option("domain", "domain: DreamPRM; fixed: vanilla PRM (uniform, no upper level); "
                                "instance-table: one weight per training CoT; instance-net: a small net maps a CoT's "
                                "step values and MC labels to its weight (DreamPRM-1.5); instance: instance-table; "
                                "domain-instance: a domain weight times a table weight normalised within the domain, "
                                "one hypergradient for both", choices=WEIGHTINGS)
    iterations: int = prm.option(1000, "outer iterations, each U lower steps + 1 upper step (>= 1)",
                                 type=prm.number(int, 1, 10 ** 9), presets={"toy": 150, "toy instance modes": 750})
    unroll_steps: int = prm.option(5, "U: lower steps per upper step (>= 1)", type=prm.number(int, 1, 10 ** 6),
                                   presets={"instance modes": 1})
    train_batch: int = prm.option(8, "training CoTs per lower step (>= 1)", type=prm.number(int, 1, 1 << 20),
                                  presets={"toy": 16})
    meta_batch: int = prm.option(16, "meta CoTs per upper step (>= 1)", type=prm.number(int, 1, 1 << 20),
                                 presets={"toy": 32})
    lr: float = prm.option(5e-7, "xi, the lower (PRM) learning rate (> 0 and finite)",
                           type=prm.number(float, 0, 10.0, above=True), presets={"toy": 1e-4, "--model tiny": 1e-4})
    meta_lr: float = prm.option(0.01, "learning rate of the raw weights a (> 0)",
                                type=prm.number(float, 0, 1e6, above=True),
                                presets={"toy": 0.05, "instance-table": 0.1, "instance-net": 0.01,
                                         "domain-instance": 0.05})
    weight_decay: float = prm.option(0.0, "AdamW weight decay on phi (>= 0; each step scales phi by 1 - lr x weight "
                                     "decay, so their product must stay below 1)", type=prm.number(float, 0, 1e6))
    fd_radius: float = prm.option(0.01, "r: finite-difference radius, eps = r / ||v|| (> 0)",
                                  type=prm.number(float, 0, 1e3, above=True))
    upper_loss: str = prm.option("mse", "upper loss on A(V) against r", choices=("mse", "bce"))
    cold_start: int = prm.option(0, "outer iterations of plain training before the weights move (>= 0)",
                                 type=prm.number(int, 0), presets={"toy instance modes": 100})
    no_aggregation: bool = prm.option(False, "ablation: upper loss is step-level MSE instead of the "
                                      "aggregation-function loss")
    seed: int = prm.option(0, "seed for the value head and the batch order (>= 0)",
                           type=prm.number(int, 0, 2 ** 31 - 1))


@dataclass
class InstanceWeights:
    """Instance weights (DreamPRM-1.5)"""
    weight_max: float = prm.option(3.0, "instance modes: weights lie in (0, this) (> 1), 1 at the start",
                                   type=prm.number(float, 1, 1e6, above=True))
    instance_batch: int = prm.option(None, "instance modes: training CoTs whose weights each upper step moves "
                                     "(>= 1; default: 4 x --train-batch)", type=prm.number(int, 1, 1 << 20))
    net_hidden: int = prm.option(64, "instance-net: hidden width (>= 1)", type=prm.number(int, 1, 1 << 16))


@dataclass
class Schedule:
    """The lower optimizer's schedule (off by default, as in the paper's method)"""
    recipe: str = prm.option(None, "a published recipe's settings for the flags below (each flag's help gives them)",
                             choices=RECIPES)
    lr_schedule: str = prm.option("constant", "the lower lr over the run's lower steps: constant, cosine (to 0 at "
                                  "the end) or step (x --lr-gamma every --lr-step steps), after --warmup",
                                  choices=("constant", "cosine", "step"),
                                  presets={"--recipe dreamprm": "step", "--recipe dreamprm-1.5": "cosine"})
    warmup: float = prm.option(0.0, "fraction of the lower steps over which the lr rises linearly from 0",
                               type=prm.number(float, 0, 0.9), presets={"--recipe dreamprm-1.5": 0.05})
    lr_step: int = prm.option(5000, "step schedule: lower steps between two decays", type=prm.number(int, 1, 10 ** 9))
    lr_gamma: float = prm.option(0.5, "step schedule: the factor of each decay",
                                 type=prm.number(float, 0, 1, above=True))
    grad_clip: float = prm.option(0.0, "clip the lower gradient's norm to this before each step (0: off)",
                                  type=prm.number(float, 0, 1e6), presets={"--recipe dreamprm-1.5": 1.0})
    meta_weight_decay: float = prm.option(0.0, "weight decay on the raw weights a (Adam's, L2 in the gradient)",
                                          type=prm.number(float, 0, 1e3), presets={"--recipe dreamprm": 1e-3})
    grad_accum: int = prm.option(1, "split each lower batch into this many micro-batches, gradients summed: the same "
                                 "step, less activation memory (not instance-net)", type=prm.number(int, 1, 1024))


@dataclass
class Memory:
    """Memory and precision (README, Memory)"""
    precision: str = prm.option("fp32", "bf16: bf16 compute with fp32 master weights (updates are never rounded "
                                "away)", choices=("fp32", "bf16"))
    freeze_vision: bool = prm.option(False, "keep the vision tower fixed (a third of a 2B model's parameters: less "
                                     "memory; the published code trains every parameter)")
    offload_restore: bool = prm.option(False, "keep the hypergradient's exact copy of phi in CPU memory (pinned), "
                                       "not on the GPU (4 bytes per parameter less; bitwise the same)")
    compact_states: bool = prm.option(False, "keep AdamW's two moments in bf16 with stochastic rounding: 4 bytes "
                                      "per parameter less, not exact (see README, Memory)")
    grad_checkpointing: bool = prm.option(False, "recompute activations in backward, layer by layer (less memory; "
                                          "exact, also with --group-by-question)")
    group_by_question: bool = prm.option(False, "shared-prefix training: a batch holds the CoTs of a few questions, "
                                         "and each question's image and text run once for all its CoTs (train, meta "
                                         "and hypergradient forwards); the same loss and gradients per batch, batches "
                                         "drawn by question (README, Training options)")
    device: str = prm.option("auto", "auto, cpu, cuda, cuda:1, ...")
    trust_remote_code: bool = prm.option(False, "allow model code from the model directory")


@dataclass
class RunDir:
    """The run directory"""
    out: str = prm.option(None, "run directory (default: runs/toy for the toy demo, runs/synthetic for --synthetic, "
                          "else runs/NAME-WEIGHTING after the first --train file: never another run's)")
    save_every: int = prm.option(50, "checkpoint every N outer iterations (>= 1)", type=prm.number(int, 1))
    log_every: int = prm.option(10, "metrics and weights every N outer iterations (>= 1)", type=prm.number(int, 1),
                                presets={"toy instance modes": 50})
    eval_every: int = prm.option(None, "iterations between evaluations on --eval (default: --log-every)",
                                 type=prm.number(int, 1, 10 ** 9))
    resume: bool = prm.option(False, "continue the run in --out from its checkpoint (the settings must match the "
                              "stored config.json, except --iterations upward, --device, --save-every, --log-every "
                              "and --eval-every)")
    overwrite: bool = prm.option(False, "replace the outputs of another run in --out")
    no_baseline: bool = prm.option(False, "toy demo: skip the vanilla PRM baseline (by default a toy DreamPRM run "
                                   "also trains one into OUT-vanilla, for rerank.py)")


OPTIONS = (Data, prm.InputFormat, Reading, Method, InstanceWeights, Schedule, Memory, RunDir)


def preset_names(args, toy):
    """The presets that apply to this run, in order (the first that gives a flag a value wins)."""
    names = [f"--recipe {args.recipe}"] if args.recipe else []
    if KINDS[args.weighting].per_cot:
        names += [args.weighting, "instance modes"] + (["toy instance modes"] if toy else [])
    return names + (["toy"] if toy else ["--model tiny"] if args.model == "tiny" else [])


def parse_args(argv):
    """The flags, checked at parse time; unset ones filled from the presets."""
    ap = prm.Parser(__doc__)
    for options in OPTIONS:
        prm.add_options(ap, options)
    args = ap.parse_args(argv)
    toy = not args.train and not args.meta
    args.weighting = "instance-table" if args.weighting == "instance" else args.weighting
    prm.fill_presets(args, OPTIONS, preset_names(args, toy))
    if args.domains is not None:                  # checked before any data or model is read
        args.domains = parse_domains(args.domains)
    if args.instance_batch is None:
        args.instance_batch = 4 * args.train_batch
    if args.grad_accum > 1 and KINDS[args.weighting].reads_values:
        raise prm.DataError("the Instance Net reads the whole batch's values: no --grad-accum with it",
                            field="--grad-accum")
    if args.eval_every is None:
        args.eval_every = args.log_every
    if args.lr * args.weight_decay >= 1:
        raise prm.DataError(f"{args.weight_decay:g} with --lr {args.lr:g}: each step would scale phi by 1 - lr x weight "
                            f"decay = {1 - args.lr * args.weight_decay:g}, which must stay above 0", field="--weight-decay")
    if args.out is None:
        args.out = default_out(args)
    return args


def default_out(args):
    """A run directory named after what the run trains on, so that runs never share one."""
    if not args.train and not args.meta:
        return "runs/synthetic" if args.synthetic else "runs/toy"
    name = os.path.splitext(os.path.basename(args.train[0]))[0] if args.train else "run"
    return f"runs/{name}-{args.weighting}"


def runs(argv):
    """The run the flags ask for; then, for the toy demo (no data flags), the vanilla PRM baseline
    that rerank.py compares with, unless --no-baseline or it is trained already."""
    args = parse_args(argv)
    toy_demo = not args.train and not args.meta and not args.synthetic
    yield args
    baseline = args.out.rstrip("/") + "-vanilla"
    if toy_demo and KINDS[args.weighting] is DomainWeighting and not args.no_baseline and \
            not os.path.isdir(os.path.join(baseline, "prm")):
        print(f"training the vanilla PRM baseline (uniform weights) into {baseline} for rerank.py")
        resume = os.path.isfile(os.path.join(baseline, "checkpoint", "state.json"))
        yield parse_args(baseline_argv(argv, baseline, resume))


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


# ==============================================================================================
# Appendix D. The run directory: setup, checkpoints (safetensors + JSON, atomic), metrics, outputs
# ==============================================================================================

# Flags that may differ when a run is resumed (--iterations only upward); every other setting in
# config.json must match, or the resumed run would silently mix two experiments.
RESUMABLE = ("iterations", "device", "save_every", "log_every", "eval_every", "resume", "overwrite", "no_baseline")


RUN_DAMAGED = "the run directory is damaged or incomplete"
RUN_OUTPUTS = ("metrics.jsonl", "config.json", "domain_weights.json", "domain_weights.png", "prm", "checkpoint",
               "eval.jsonl")


@contextmanager
def claim_run_dir(out):
    """`with claim_run_dir(out) as run_lock:` the run directory's lock, taken first, before anything
    in it is read, removed or written, and held for the whole run: --out must be writable and held
    by no live run (one line and exit 2 if it is). A folder made here for a run that stops before
    writing anything is removed again."""
    new = not os.path.exists(out)
    prm.check_writable(out)
    lock = prm.output_lock(os.path.join(out, "run")).hold()
    try:
        yield lock
    except BaseException:
        if new and os.listdir(out) == ["run.lock"]:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        lock.close()


def check_still_ours(run_lock):
    """Before writing outputs or reporting success: the run directory is still the one this run
    locked (not removed and remade under it by another process)."""
    if not run_lock.owned():
        raise prm.DataError("the run directory was removed or replaced while this run trained: its files are not "
                            "this run's; nothing more is written", file=os.path.dirname(run_lock.path))


@contextmanager
def open_run(args):
    """`with open_run(args) as run:` the run's directory claimed (claim_run_dir) and everything
    before the loop set up (setup_run); when the block ends without an error, the PRM, the final
    weights and their plot are saved (finish_run). An error leaves the last checkpoint as it was."""
    with claim_run_dir(args.out) if prm.processes()[0] == 0 else nullcontext() as run_lock:
        run = setup_run(args, run_lock)
        try:
            yield run
        except Diverged as e:
            raise Diverged(diverged_message(args, run.done, e), e.level) from None
        finish_run(run)


def prepare_run_dir(args, config):
    """Check --out (locked by claim_run_dir) before any model loads: --resume only onto a readable
    checkpoint whose stored config matches (data digests included); no silent overwrite of another
    run. Returns (the checkpoint's iteration or 0, the outputs --overwrite is to replace)."""
    out = args.out
    prm.recover_dir(os.path.join(out, "checkpoint"))
    state = os.path.join(out, "checkpoint", "state.json")
    if args.resume:
        if not os.path.isfile(state):
            raise prm.DataError("no checkpoint to resume from", file=out)
        stored = prm.read_json_object(os.path.join(out, "config.json"), RUN_DAMAGED)
        new = json.loads(json.dumps(config))                   # tuples and lists compare alike
        differ = sorted(k for k in set(stored) & set(new)
                        if k not in RESUMABLE and not prm.same_setting(k, stored[k], new[k]))
        if differ:
            raise prm.DataError("--resume with other settings than the stored run: "
                                + ", ".join(f"{k} {stored[k]!r} -> {new[k]!r}" for k in differ), file=out)
        at = prm.read_json_object(state, RUN_DAMAGED).get("iteration")
        if type(at) is not int or at < 0:
            raise prm.DataError("no iteration number: the checkpoint is damaged", file=state, field="iteration")
        if args.iterations < at:
            raise prm.DataError(f"the checkpoint is at iteration {at}; --iterations {args.iterations} is below it",
                                file=out, field="--iterations")
        if args.iterations != stored.get("iterations", args.iterations) and \
                (args.lr_schedule == "cosine" or args.warmup > 0):
            schedule = "the cosine schedule" if args.lr_schedule == "cosine" else "the --warmup fraction"
            raise prm.DataError(f"{args.iterations} where the run has {stored['iterations']}: {schedule} spans the "
                                "run's lower steps, so a longer run follows another lr schedule than the steps already "
                                f"taken; resume with --iterations {stored['iterations']}, or start again with "
                                "--overwrite", file=out, field="--iterations")
        return at, []
    present = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(out, n))]
    if present and not args.overwrite:
        what = "a checkpoint: pass --resume to continue it" if "checkpoint" in present else \
            f"another run's outputs ({', '.join(present)})"
        raise prm.DataError(f"the run directory holds {what}, --overwrite to replace them, or choose another --out",
                            file=out)
    return 0, present


def clear_run_dir(out, present):
    """--overwrite: remove the old run's outputs, once every check of the new run has passed."""
    for n in present:
        path = os.path.join(out, n)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def data_digest(records):
    """SHA-1 of what training reads of a set of records (keys, steps, labels, correctness), stored in
    config.json: a resume onto changed data stops instead of mixing two experiments."""
    h = hashlib.sha1()
    for r in records:
        h.update(json.dumps([r.get("_key"), r["id"], r["question"], r["steps"], r.get("mc"), r.get("correct"),
                             r.get("image")]).encode())
    return h.hexdigest()


def setup_model(args, train, meta, held_out, domains, device, rank):
    """The PRM and the run directory before the first step: the final-answer rule, the run directory (checked before any
    model loads), config.json, the PRM on its backbone with this run's reading settings, the CoTs
    that fit --max-length, and the memory options. Returns (model, train, meta, start iteration,
    (training, meta) CoTs skipped as too long)."""
    final_answer = final_answer_rule(args, train)
    print(f"{len(train)} training CoTs in {len(domains)} domains: "
          + ", ".join(f"{d} {sum(r['domain'] == d for r in train)}" for d in domains) + f"; {len(meta)} meta CoTs")
    model_dir = from_process_0(prm.resolve_model(args.model) if rank == 0 else None)   # 'tiny': written once
    config = dict(vars(args), domains=domains, n_train=len(train), n_meta=len(meta), final_answer=final_answer,
                  model_dir=model_dir, train_digest=data_digest(train), meta_digest=data_digest(meta),
                  eval_digest=data_digest(held_out))
    start, old_outputs = from_process_0(prepare_run_dir(args, config) if rank == 0 else None)
    model = prm.PRM.from_backbone(model_dir, seed=args.seed, trust_remote_code=args.trust_remote_code, device=device)
    model.final_answer = final_answer
    if args.max_side is not None:
        model.max_side = args.max_side or None
    model.min_pixels, model.max_pixels = args.min_pixels, args.max_pixels
    model.max_length = args.max_length or model.max_length
    train, long_train = drop_long(model, train, "training")
    meta, long_meta = drop_long(model, meta, "meta") if meta else (meta, 0)
    for d in domains:
        if not any(r["domain"] == d for r in train):
            raise prm.DataError(f"domain '{d}' has no CoT within --max-length {model.max_length}", field="--domains")
    if rank == 0:
        clear_run_dir(args.out, old_outputs)
        prm.write_json_atomic(os.path.join(args.out, "config.json"), config)
    model.train()
    if args.freeze_vision:
        freeze_vision(model)
    if args.grad_checkpointing:
        enable_checkpointing(model)
    return model, train, meta, start, (long_train, long_meta)


@dataclass
class Run:
    """What a run sets up before its loop: the data, the PRM, the seams the method calls (forward,
    weighting, the upper level), the optimizers, the progress bar (over the iterations left) and
    the logging state."""
    args: object
    rank: int                # this process under torchrun (0 writes the outputs), else 0
    device: object
    model: object
    train: list
    meta: list
    train_groups: list       # the training CoTs' indices by question (--group-by-question), else one each
    meta_groups: list        # the same for the meta CoTs
    domains: list
    held_out: list
    autocast: object
    forward: object          # forward(records) -> (B, S) values, (B, S) mask
    weighting: Weighting
    upper: Upper
    opt_phi: object
    opt_a: object
    clip: float              # the lower gradient's largest norm (--grad-clip; inf: none)
    bar: object
    history: list
    n_long: tuple
    run_lock: object
    sums: dict               # the losses summed since the last log (new_sums)
    done: int                # iterations done (the resumed checkpoint's, then each end_of_iteration's)
    w_all: object = None     # every training CoT's weight (N,) at the latest log: finish_run's, after the last


def setup_run(args, run_lock):
    """Everything before the loop, in the order a run needs it: the data (checked before any model
    loads), the held-out split, the PRM and its run directory, the seams, the optimizers, and the
    checkpoint to resume from."""
    rank, world, device = start_processes(args)
    torch.manual_seed(args.seed)
    train, meta, domains = load_data(args)
    held_out = load_held_out(args)                                       # --eval, or []
    # Under torchrun the PRM loads into CPU memory, and sharding moves each unit's shard to the GPU.
    model, train, meta, start, n_long = setup_model(args, train, meta, held_out, domains,
                                                    device if world == 1 else torch.device("cpu"), rank)
    if world > 1:
        shard_prm(model, device, world, keep_gathered=args.group_by_question)
    phi = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    forward = (SharedPrefixForward if args.group_by_question else PackedForward)(model, autocast)
    if world > 1:
        forward = ShardedForward(forward, rank, world)
    weighting = make_weighting(args, train, domains, device, forward)
    opt_phi = lower_optimizer(phi, args.lr, args.weight_decay, args.compact_states, args.seed)
    opt_a = upper_optimizer(weighting.a, args.meta_lr, args.meta_weight_decay)
    upper = Upper(forward, phi, weighting, opt_a, args.fd_radius, CpuCopy if args.offload_restore else device_copy,
                  make_meta_loss(args))
    start, history = resume_or_start(args.out, start, model, weighting.a, opt_phi, opt_a, domains, rank)
    return Run(args=args, rank=rank, device=device, model=model, train=train, meta=meta,
               train_groups=question_groups(train, args.group_by_question),
               meta_groups=question_groups(meta, args.group_by_question), domains=domains, held_out=held_out,
               autocast=autocast, forward=forward, weighting=weighting, upper=upper, opt_phi=opt_phi, opt_a=opt_a,
               clip=args.grad_clip or math.inf,
               bar=prm.progress(range(start, args.iterations), initial=start, total=args.iterations, desc="bilevel"),
               history=history, n_long=n_long, run_lock=run_lock, sums=new_sums(), done=start)


def end_of_iteration(run, done, batches, L_meta, seconds):
    """After iteration `done`: its losses summed; the weights and a metrics row every --log-every (else
    alpha on the bar), held-out figures every --eval-every, a checkpoint every --save-every (and at the end)."""
    args, last = run.args, done == run.args.iterations
    run.done = done
    add_losses(run.sums, batches, L_meta)
    if done % args.log_every == 0 or last:
        log_weights(run, done, seconds)
    elif isinstance(run.weighting, DomainWeighting):          # DreamPRM's alpha: cheap, on the bar every iteration
        show_weights(run.bar, run.weighting.per_domain(None, run.train, run.domains), run.weighting)
    if run.held_out and (done % args.eval_every == 0 or last):
        figures = evaluate_held_out(run.forward, run.held_out, args.train_batch)
        if run.rank == 0:
            log_eval(args.out, done, figures)
    if done % args.save_every == 0 or last:
        save_checkpoint(args.out, run.model, run.weighting.a, run.opt_phi, run.opt_a, done, run.run_lock)


def add_losses(sums, batches, L_meta):
    """An iteration's losses into the running sums (new_sums) that the next metrics row averages."""
    for batch in batches:
        sums["lower"] += (batch.l.sum() / batch.n.sum().clamp(min=1)).item()
        sums["weighted"] += batch.L_tr.item()
    if L_meta is not None:
        sums["upper"] += L_meta
        sums["upper_n"] += 1
    sums["n"] += 1


def log_weights(run, done, seconds):
    """Every training CoT's weight (kept for finish_run), the weights per domain and their AUCs in a
    metrics row and on screen, instance weights to their file; the running sums start again."""
    args, weighting = run.args, run.weighting
    w_all = run.w_all = weighting.of_all()                                                          # (N,)
    alpha = weighting.per_domain(w_all, run.train, run.domains)
    if run.rank == 0:
        log_iteration(args.out, done, run.sums, seconds, alpha, key_auc(w_all.tolist(), run.train), args, weighting,
                      run.history)
    if weighting.per_cot and run.rank == 0:
        save_instance_weights(args.out, w_all, run.train)
    run.sums = new_sums()
    show_weights(run.bar, alpha, weighting)


def resume_or_start(run_dir, start, model, a, opt_phi, opt_a, domains, rank=0):
    """Resume from the checkpoint (start > 0) or begin metrics.jsonl afresh. Metrics logged after the
    checkpoint are replayed by the resumed run, so they are dropped. Returns (start, history), the
    history of logged weights that domain_weights.json and its plot hold."""
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if start:
        start = load_checkpoint(run_dir, model, a, opt_phi, opt_a)
        for path in (metrics_path, os.path.join(run_dir, "eval.jsonl")) if rank == 0 else ():
            kept = [o for _, o in prm.iter_jsonl(path, True)] if os.path.isfile(path) else []
            with open(path, "w") as f:
                prm.append_jsonl(f, *[o for o in kept if o["iteration"] <= start])
        print(f"resumed {run_dir} at iteration {start}")
    elif rank == 0:
        open(metrics_path, "w").close()
    prm.barrier()
    history = [{"iteration": o["iteration"], "alpha": {d: o[f"alpha/{d}"] for d in domains}}
               for _, o in prm.iter_jsonl(metrics_path, True)]
    return start, history


def load_held_out(args):
    """The --eval split: labelled CoTs (any format), read like the training data; [] without --eval."""
    if not args.eval:
        return []
    records, skips = prm.read_cots(args.eval, "labels", **prm.reading(args))
    report = prm.skip_report(skips, [r["id"] for r in records])
    print(f"{args.eval}: {len(records)} held-out CoTs" + (f"; {report}" if report else ""))
    if not records:
        raise prm.DataError("no usable held-out CoTs", file=args.eval, field="--eval")
    labels = [p >= 0.5 for r in records for p in r["mc"] if p is not None]
    unmeasured = ["no step is labelled: step AUC and step accuracy are not measured"] if not labels else \
        ["the labelled steps are of one class: the step AUC is not measured"] if len(set(labels)) == 1 else []
    if not held_out_questions(records):
        unmeasured.append("no question has `correct` on every CoT: best of N is not measured")
    for why in unmeasured:
        print(f"{args.eval}: {why} (null in eval.jsonl)")
    return sorted(records, key=prm.record_key)


def held_out_questions(records):
    """The questions best of N is measured on: each (domain, id)'s record indices, in first-seen
    order, for the questions whose CoTs all carry `correct`."""
    questions = {}
    for i, r in enumerate(records):
        questions.setdefault((r["domain"], r["id"]), []).append(i)
    return [q for q in questions.values() if all(isinstance(records[i].get("correct"), bool) for i in q)]


def evaluate_held_out(forward, records, batch_size):
    """On the held-out split: the step AUC (steps labelled >= 0.5 against those below, by V), the step
    accuracy at 0.5 (V >= 0.5 where the label is >= 0.5), and best of N (each question's pick by A,
    ties as a uniform choice; questions whose CoTs all carry `correct`). CoTs over max_length are left
    out."""
    records, V, M = scored(forward, records, batch_size)
    scores = prm.mean_logit(V, M).tolist()
    pairs = [(x, p) for r, v, m in zip(records, V, M) for x, p in zip(v[m].tolist(), r["mc"]) if p is not None]
    picks = []
    for q in held_out_questions(records):
        best = max(scores[i] for i in q)
        picks.append(prm.uniform_choice([float(records[i]["correct"]) for i in q],
                                        [[j] for j, i in enumerate(q) if scores[i] == best]))
    return {"eval/step_auc": auc([x for x, _ in pairs], [p >= 0.5 for _, p in pairs]),
            "eval/step_accuracy": sum((x >= 0.5) == (p >= 0.5) for x, p in pairs) / len(pairs) if pairs else None,
            "eval/best_of_n": sum(picks) / len(picks) if picks else None, "eval/questions": len(picks)}


def scored(forward, records, batch_size):
    """(records, V, M): the records that fit max_length, their (N, S) step values by the run's
    forward, without gradients, batch_size CoTs at a time, and the values' mask. Under torchrun each
    process scores a block of the CoTs (in as many forwards as the others) and the sums give every
    process all the values."""
    model = forward.model
    kept = [(r, e) for r, e in ((r, model.encode(r, cache=True)) for r in records) if model.fits(e)]
    records = [r for r, _ in kept]
    S = max((len(e.step_ends) for _, e in kept), default=0)
    V = torch.zeros(len(records), S, device=model.device)                             # (N, S) step values
    M = torch.zeros(len(records), S, device=model.device)                             # (N, S) their mask
    pieces = math.ceil(math.ceil(len(records) / prm.processes()[1]) / batch_size)
    with torch.no_grad():
        for idx in forward.share(len(records), pieces) if records else ():
            values, mask = forward([records[i] for i in idx.tolist() or [0]])        # (b, S_b); a block run dry: any CoT
            V[idx, :values.shape[1]], M[idx, :values.shape[1]] = values[:len(idx)].float(), mask[:len(idx)].float()
    return records, forward.sum(V), forward.sum(M).bool()


def log_eval(run_dir, done, figures):
    """The held-out figures: a line on screen and a row of eval.jsonl."""
    tqdm.write(f"iteration {done}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in figures.items()))
    with open(os.path.join(run_dir, "eval.jsonl"), "a") as f:
        prm.append_jsonl(f, {"iteration": done, **figures})


def new_sums():
    """Running sums of the losses between two logs."""
    return dict(lower=0.0, weighted=0.0, upper=0.0, n=0, upper_n=0)


def log_iteration(run_dir, done, sums, seconds, alpha, aucs, args, weighting, history):
    """One metrics.jsonl row (losses averaged since the last log, weights, toy AUCs), the weights'
    history in domain_weights.json, and a line on screen: the losses, the weights (none for fixed
    weights) and, in the toy world, the AUCs worth reading."""
    k = sums["n"]
    row = {"iteration": done, "lower/loss": sums["lower"] / (k * args.unroll_steps),
           "lower/weighted_loss": sums["weighted"] / (k * args.unroll_steps),
           "upper/loss": sums["upper"] / sums["upper_n"] if sums["upper_n"] else None,   # none in a cold start
           "time/seconds_per_iteration": seconds}
    row.update({f"alpha/{d}": w for d, w in alpha.items()})
    row.update({f"auc/{name}": v for name, v in aucs.items()})
    shown = [f"lower/loss {row['lower/loss']:.4f}"] + \
        ([f"upper/loss {row['upper/loss']:.4f}"] if row["upper/loss"] is not None else []) + \
        ([f"alpha/{d} {w:.3f}" for d, w in alpha.items()] if weighting.moves else []) + \
        [f"auc/{name} {v:.3f}" for name, v in shown_aucs(aucs, weighting).items()]
    tqdm.write(f"iteration {done}: " + ", ".join(shown))
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        prm.append_jsonl(f, row)
    history.append({"iteration": done, "alpha": alpha})
    write_weights(run_dir, alpha, args.weighting, history)


def show_weights(bar, alpha, weighting):
    """The weights on the progress bar (none for fixed weights, which never move)."""
    if weighting.moves:
        bar.set_postfix_str(" ".join(f"{d}={x:.2f}" for d, x in list(alpha.items())[:6]))


def shown_aucs(aucs, weighting):
    """The toy AUCs worth printing: none for fixed weights (all equal), the overall one for domain
    weights (equal inside a domain, so 0.5 there by construction), all of them for instance weights."""
    if not weighting.moves:
        return {}
    return aucs if weighting.per_cot else {k: v for k, v in aucs.items() if k == "overall"}


def finish_run(run):
    """The PRM with its model card, the final weights and their plot, and what was learned on screen
    (each written only while the run directory is still this run's)."""
    run.bar.close()
    args, model, train, meta, domains, history, n_long = run.args, run.model, run.train, run.meta, run.domains, \
        run.history, run.n_long
    w = run.w_all           # logged at the last iteration; computed here when a resumed run had none left
    if w is None:
        w = run.weighting.of_all()
    alpha = run.weighting.per_domain(w, train, domains)
    # Sharded over processes (torchrun): every process helps gather the PRM, a tensor at a time; process 0 writes it.
    state = gathered(model.state_dict().items(), run.rank == 0) if torch.distributed.is_initialized() else None
    if run.rank > 0:
        saturation_note(run.forward, train[:64], args.lr, args.train_batch)     # its share, with process 0's
        return
    check_still_ours(run.run_lock)
    instance = run.weighting.per_cot
    learned = ", ".join(f"{d} {x:.3f}" for d, x in sorted(alpha.items(), key=lambda x: -x[1]))
    card = [f"- DreamPRM bi-level training (weighting: {args.weighting}), {args.iterations} outer iterations of "
            f"{args.unroll_steps} lower steps; lower lr {args.lr}, meta lr {args.meta_lr}, precision {args.precision}",
            f"- training CoTs: {len(train)} (" + ", ".join(f"{d} {sum(r['domain'] == d for r in train)}"
                                                       for d in domains) + f"); meta CoTs: {len(meta)}",
            f"- skipped as longer than {model.max_length} tokens: {n_long[0]} training, {n_long[1]} meta CoTs",
            "- learned domain weights: " + learned if run.weighting.moves else "- domain weights: uniform (fixed)"]
    model.save_pretrained(os.path.join(args.out, "prm"), card, state)
    write_weights(args.out, alpha, args.weighting, history)
    plot_weights(history, domains, os.path.join(args.out, "domain_weights.png"))
    check_still_ours(run.run_lock)
    if run.weighting.moves:
        quality = toy_quality(args, alpha)
        what = "mean instance weight per domain" if instance else "learned domain weights (alpha)"
        print(what + (" next to each toy domain's true quality (3 best):" if quality else ":"))
        for d, x in sorted(alpha.items(), key=lambda x: -x[1]):
            print(f"  {d:24s} {x:.3f}" + (f"   quality {quality[d]}" if quality else ""))
        aucs = shown_aucs(key_auc(w.tolist(), train), run.weighting)
        if aucs:
            print("AUC of the weights, clean-key against corrupted-key CoTs: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()))
    print(f"PRM saved to {os.path.join(args.out, 'prm')}")
    note = saturation_note(run.forward, train[:64], args.lr, args.train_batch)
    if note:
        print(note)


def saturation_note(forward, records, lr, batch):
    """One line when the PRM's step values have collapsed to 0 or 1 (at least 90% of them within
    1e-3 of either, on the first training CoTs) while their labels have not: a lower lr that is too
    high for the backbone drives every value to one side, and the run would otherwise finish
    silently with a PRM that ranks nothing. None when the values are not saturated. The CoTs are
    scored `batch` at a time (the lower step's batch), so this never needs more memory than training."""
    records, V, M = scored(forward, records, batch)
    P, p_mask = label_tensors(records, V.shape[1], V.device)
    V, P = V[M & p_mask], P[M & p_mask]                                       # labelled steps
    saturated = ((V < 1e-3) | (V > 1 - 1e-3)).float().mean().item() if V.numel() else 0.0
    label_mean = P.mean().item() if P.numel() else 0.5
    if saturated < 0.9 or not 0.05 < label_mean < 0.95:
        return None
    return (f"warning: the PRM's step values saturate: {100 * saturated:.0f}% of them lie within 0.001 of 0 or 1 "
            f"(mean {V.mean().item():.3g}, mean label {label_mean:.2f}, on {len(records)} training CoTs); the lower lr is "
            f"likely too high for this backbone: rerun with a smaller --lr (now {lr:g}) and --overwrite")


def optimizer_tensors(opt, prefix, keep=True):
    """An optimizer's per-parameter state as flat tensors {prefix.i.name: tensor}, whole (gathered)."""
    return gathered(((f"{prefix}.{i}.{name}", t if torch.is_tensor(t) else torch.tensor(t))
                     for i, p in enumerate(opt.param_groups[0]["params"]) for name, t in opt.state.get(p, {}).items()),
                    keep)


def gathered(named, keep):
    """{name: tensor} whole and in CPU memory, gathered one tensor at a time, so a GPU never holds more
    than one of them whole (an 8B PRM's weights and moments, 96 GB, would not fit). Under torchrun every
    process must ask; only the one that keeps them (process 0: keep) holds them."""
    out = {}
    for name, t in named:
        t = whole(t)
        if keep:
            out[name] = t.cpu()
    return out


def load_optimizer(opt, tensors, prefix):
    params = opt.param_groups[0]["params"]
    step_on_device = opt.defaults.get("fused") or opt.defaults.get("capturable")   # else "step" stays on CPU
    for key in tensors.names:
        if key.startswith(prefix + "."):
            _, i, name = key.rsplit(".", 2)
            p, t = params[int(i)], tensors[key]
            if name != "step":
                t = placed(t, p)
            elif step_on_device:
                t = t.to(p.device)
            opt.state.setdefault(p, {})[name] = t
    return opt


def trainable_state(model, keep):
    """What a checkpoint must hold of the model: every trainable tensor (backbone and head), whole."""
    return gathered(((k, v.detach()) for k, v in model.named_parameters() if v.requires_grad), keep)


def save_checkpoint(run_dir, model, a, opt_phi, opt_a, iteration, run_lock):
    """The checkpoint, whole tensors (a run resumes on any number of processes), written by process 0."""
    keep = run_lock is not None                                                     # process 0
    state, tensors = trainable_state(model, keep), optimizer_tensors(opt_phi, "phi", keep)   # every process gathers
    if not keep:
        return
    check_still_ours(run_lock)
    with prm.atomic_dir(os.path.join(run_dir, "checkpoint")) as tmp:
        prm.save_tensors_atomic(os.path.join(tmp, "model.safetensors"), state)
        tensors.update({name: x.detach() for name, x in zip(raw_weight_names(a), a)})
        tensors.update(optimizer_tensors(opt_a, "a"))
        prm.save_tensors_atomic(os.path.join(tmp, "state.safetensors"), tensors)
        prm.write_json_atomic(os.path.join(tmp, "state.json"), {"iteration": iteration})


def load_checkpoint(run_dir, model, a, opt_phi, opt_a):
    """Restore model, a and both optimizers; returns the iteration to continue from."""
    ck = os.path.join(run_dir, "checkpoint")
    weights = CheckpointFile(os.path.join(ck, "model.safetensors"))
    expected = {k: v for k, v in model.named_parameters() if v.requires_grad}
    wrong = sorted(k for k in expected if k not in weights.names or weights.shape(k) != list(expected[k].shape))
    if wrong:                                          # a tensor left out would silently restart from the backbone
        raise prm.DataError(f"the checkpoint lacks or misshapes {len(wrong)} trainable tensor(s) ({wrong[0]}, ...): "
                            "it is damaged", file=os.path.join(ck, "model.safetensors"))
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(placed(weights[k], p))
    tensors = CheckpointFile(os.path.join(ck, "state.safetensors"))
    missing = [name for name in raw_weight_names(a) if name not in tensors.names]
    if missing:
        raise prm.DataError(f"no tensor {missing[0]}: the checkpoint is damaged", file=os.path.join(ck, "state.safetensors"))
    with torch.no_grad():
        for name, x in zip(raw_weight_names(a), a):
            x.copy_(tensors[name].to(x.device))
    load_optimizer(opt_phi, tensors, "phi")
    load_optimizer(opt_a, tensors, "a")
    return prm.read_json_object(os.path.join(ck, "state.json"), RUN_DAMAGED)["iteration"]


class CheckpointFile:
    """A safetensors file of the checkpoint, read a tensor at a time (each process of a torchrun run
    places its shard of one tensor before it reads the next: read whole, an 8B PRM's checkpoint would
    sit in CPU memory once per process). A missing, truncated or garbled file is one clear error."""

    def __init__(self, path):
        self.path = path
        self.file = self.read(lambda: safe_open(path, "pt"))
        self.names = set(self.file.keys())

    def __getitem__(self, name):
        return self.read(lambda: self.file.get_tensor(name))

    def shape(self, name):
        return self.read(lambda: self.file.get_slice(name).get_shape())

    def read(self, how):
        try:
            return how()
        except Exception as e:                          # safetensors raises its own error types
            raise prm.DataError(f"unreadable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}): the "
                                "checkpoint is damaged; rerun without --resume (and with --overwrite)",
                                file=self.path) from None


def raw_weight_names(a):
    """Checkpoint names of the raw weights: 'a' for one tensor (domain or table weights), 'theta.i'
    for the Instance Net's parameters."""
    return ["a"] if len(a) == 1 else [f"theta.{i}" for i in range(len(a))]


def write_weights(run_dir, alpha, weighting, history):
    """domain_weights.json: the latest weights ("final" once the run ends) and every logged iteration's."""
    prm.write_json_atomic(os.path.join(run_dir, "domain_weights.json"),
                          {"final": alpha, "weighting": weighting, "history": history})


def plot_weights(history, names, path):
    """domain_weights.png: alpha_k from iteration 0 (every weight starts at 1) over the logged iterations."""
    history = [{"iteration": 0, "alpha": {n: 1.0 for n in names}}] + history
    its = [h["iteration"] for h in history]
    series = {n: [(i, h["alpha"][n]) for i, h in zip(its, history)] for n in names}
    y_max = max([1.5] + [y for points in series.values() for _, y in points]) * 1.05
    ticks = [(its[0], str(its[0])), (its[-1], str(its[-1]))]
    legend = {n: f"{n} {history[-1]['alpha'][n]:.2f}" for n in names}
    prm.line_plot(path, "Domain weights alpha during training", series, ticks, y_max, lambda y: f"{y:.2f}", legend,
                  x_title="outer iteration", y_title="alpha (mean 1)")


# ==============================================================================================
# Appendix E. The upper loss's ablations, the restore copy, the optimizers, memory
# ==============================================================================================

def upper_optimizer(a, lr, weight_decay):
    """The optimizer of the raw weights a: Adam, as the paper's (weight decay as L2 in the gradient)."""
    return torch.optim.Adam(a, lr=lr, weight_decay=weight_decay)


def make_meta_loss(args):
    """The upper loss, chosen once: section 2's meta_loss (MSE of A against r, as published), or an
    ablation: --upper-loss bce, --no-aggregation (w/o the aggregation function)."""
    if args.no_aggregation:
        return step_meta_loss
    return bce_meta_loss if args.upper_loss == "bce" else meta_loss


def bce_meta_loss(values, mask, records):
    """--upper-loss bce: L_meta = mean_m BCE(A(V_m1..n), r_m)."""
    r = torch.tensor([float(x["correct"]) for x in records], device=values.device)    # (M,)
    A = prm.mean_logit(values, mask)                                                 # (M,)
    return F.binary_cross_entropy(A.clamp(prm.V_CLAMP, 1 - prm.V_CLAMP), r)


def step_meta_loss(values, mask, records):
    """--no-aggregation (the w/o-AFL ablation): a step-level MSE against the meta CoTs' MC labels
    where they have them, else the last step against r."""
    p, p_mask = meta_targets(records, values.shape[1], values.device)               # (M, S)
    l, n = step_losses(values, mask, p, p_mask)
    return (l / n.clamp(min=1)).mean()


def device_copy(phi):
    """The hypergradient's restore copy of phi, beside it."""
    return [p.detach().clone() for p in phi]


class CpuCopy:
    """--offload-restore: the restore copy in CPU memory, pinned on CUDA: 4 bytes per parameter less
    GPU memory, the same bits restored. Iterated, it gives each parameter's copy as the hypergradient
    copies it back: a plain CPU tensor, or (the PRM sharded under torchrun, whose processes each keep
    their shards) this process's shard returned to its device, one parameter at a time."""

    def __init__(self, phi):
        from torch.distributed.tensor import DTensor
        self.phi = phi
        local = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in phi]
        self.saved = [x.to("cpu", copy=True).pin_memory() if x.is_cuda else x.to("cpu", copy=True) for x in local]

    def __iter__(self):
        from torch.distributed.tensor import DTensor
        for p, s in zip(self.phi, self.saved):
            yield DTensor.from_local(s, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                     stride=p.stride()) if isinstance(p, DTensor) else s


def freeze_vision(model):
    """Train the language model and the value head only: the vision tower keeps its weights (no
    gradients, no optimizer state, no hypergradient buffers for it)."""
    vision = getattr(model.backbone, model.family.vision_tower, None) if model.family else None
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

    def __init__(self, params, lr, weight_decay, seed, betas=(0.9, 0.999), eps=1e-8):
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
        from torch.distributed.tensor import DTensor
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.init_state(p)
                state["step"] += 1
                t = int(state["step"])
                # Sharded (torchrun): each process updates its shards, with rounding noise of its own.
                local = [x.to_local() if isinstance(x, DTensor) else x
                         for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                key = (self.seed, t, j) + ((prm.processes()[0],) if isinstance(p, DTensor) else ())
                gen = torch.Generator(local[0].device).manual_seed(zlib.crc32(repr(key).encode()))
                c1, c2 = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
                flat = [local[0].view(-1), local[1].reshape(-1), local[2].view(-1), local[3].view(-1)]
                for i in range(0, local[0].numel(), self.CHUNK):
                    w, g, m16, s16 = (x[i:i + self.CHUNK] for x in flat)
                    m = m16.float().lerp_(g, 1 - beta1)                          # m = b1 m + (1 - b1) g
                    s = s16.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)  # s = b2 s + (1 - b2) g^2
                    m16.copy_(stochastic_round_bf16(m, gen))
                    s16.copy_(stochastic_round_bf16(s, gen))
                    w.mul_(1 - group["lr"] * group["weight_decay"])
                    w.addcdiv_(m, s.sqrt_().div_(c2).add_(group["eps"]), value=-group["lr"] / c1)


def lower_optimizer(phi, lr, weight_decay, compact, seed, fused=None):
    """AdamW on phi. fused (default: when phi lies on one CUDA or CPU device, as TRL's default
    optimizer does) runs one kernel per step that updates every tensor in place. torch's default
    on CUDA, foreach, first computes sqrt(v_hat) for all of phi at once: a temporary of 4 bytes per
    parameter that is alive while phi, its gradients and both moments are too, which makes the
    optimizer step the peak of a 2B run (20 instead of 16 bytes per parameter); torch's default on
    the CPU loops over the tensors, about 3x slower (61 against 21 ms a step for 9.8 M parameters,
    one thread). Same arithmetic, agreement with the per-tensor loop tested (the last bits differ).
    compact (--compact-states): CompactAdamW, bf16 moments."""
    if compact:
        return CompactAdamW(phi, lr=lr, weight_decay=weight_decay, seed=seed)
    if fused is None:
        fused = bool(phi) and len({p.device for p in phi}) == 1 and phi[0].device.type in ("cuda", "cpu")
    return torch.optim.AdamW(phi, lr=lr, weight_decay=weight_decay, fused=fused or None)


def enable_checkpointing(model):
    """Recompute activations in backward, layer by layer (non-reentrant, transformers' default; the
    method was renamed in 5.2x, so use what exists). Layers keep the shared-prefix cache when they
    run again in backward: its updates give the same keys and values on every run
    (prm.prefix_writer, prm.prefix_reader), and the packed forward has no cache."""
    bb = model.backbone
    (getattr(bb, "activation_checkpointing_enable", None) or bb.gradient_checkpointing_enable)()
    for layer in bb.modules():
        if hasattr(layer, "_can_checkpoint_with_cache"):
            layer._can_checkpoint_with_cache = True


# ==============================================================================================
# Appendix F. Shared-prefix training (--group-by-question): a question's image and text encoded once, batches by question
# ==============================================================================================

class SharedPrefixForward(PackedForward):
    """--group-by-question: step values of a batch whose CoTs share prompts. The CoTs of each prompt
    (image and question) run as one prm.shared_prefix_values call, the prompt encoded once with
    gradients, the continuations attending to its cache, so the backward pass gives the prompt the
    sum of its CoTs' gradients. (B, S) values and mask in the batch's order, equal to PackedForward's."""

    def __call__(self, records):
        encoded = [self.model.encode(r, cache=True) for r in records]
        rows = [None] * len(encoded)
        with self.autocast:
            for members in question_groups(records, True):   # one prompt: the question's text and its image
                values, mask = prm.shared_prefix_values(self.model, [encoded[b] for b in members])    # (n, S_g)
                for j, b in enumerate(members):
                    rows[b] = values[j][mask[j]]
        return prm.pad_rows(rows, 0.0, dtype=rows[0].dtype, device=self.model.device)             # (B, S), (B, S)


def prompt_key(r):
    """What a record's prompt is made of: the user-turn text and the image file."""
    return r["_question"] if "_question" in r else prm.question_text(r), r.get("_image")


def question_groups(records, grouped):
    """The training (or meta) records' indices by prompt, in first-seen order, for draw(); one group per
    record when batches are plain random CoTs."""
    if not grouped:
        return [[i] for i in range(len(records))]
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault(prompt_key(r), []).append(i)
    return list(groups.values())


# ==============================================================================================
# Appendix G. More than one process: torchrun, the PRM sharded with FSDP2
# ==============================================================================================

class ShardedForward:
    """A forward (PackedForward or SharedPrefixForward) under torchrun with N processes: the PRM
    sharded with FSDP2 (shard_prm), each process computing its share of every batch (a contiguous
    block of CoTs: with --group-by-question, whole questions but where a block ends) and the sums over
    the processes all-reduced. Every process draws the same global batches and computes their labels
    and weights (pure functions of the seed), so the method is the one-process one."""

    def __init__(self, forward, rank, world):
        from torch.distributed.fsdp import FSDPModule
        self.forward, self.model, self.rank, self.world = forward, forward.model, rank, world
        # shard_prm keeps the units gathered for the shared prefix (keep_gathered) until they are released
        self.keep_gathered = isinstance(forward, SharedPrefixForward)
        self.units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]

    def __call__(self, records):
        out = self.forward(records)
        if self.keep_gathered and not torch.is_grad_enabled():
            self.release()                      # no backward follows
        return out

    def release(self):
        """Free the gathered units: the next forward gathers the shards as they are then (a step or
        the hypergradient's perturbation changes the shards only)."""
        for unit in self.units:
            unit.reshard()

    def share(self, n, pieces):
        return torch.arange(n).tensor_split(self.world)[self.rank].tensor_split(pieces)

    def sum(self, x):
        torch.distributed.all_reduce(x)
        return x

    def backward(self, loss):
        (loss * self.world).backward()          # FSDP2 averages the gradients over the processes: this sums them
        if self.keep_gathered:
            self.release()

    def norm(self, v):
        squares = torch.stack([torch.linalg.vector_norm(g.to_local().float()) for g in v]).square().sum()
        torch.distributed.all_reduce(squares)
        return squares.sqrt().item()


def start_processes(args):
    """(rank, world size, device). Under torchrun: the process group joined (nccl on CUDA, gloo on
    the CPU), one CUDA device per process, other processes' output silenced, and batches too small
    to share refused in one line; (0, 1, --device) in a plain run."""
    rank, world = prm.processes()
    device = prm.pick_device(args.device)
    if world == 1:
        return 0, 1, device
    if args.train_batch < world * args.grad_accum or args.meta_batch < world:
        raise prm.DataError(f"{world} processes need --train-batch of at least {world} x --grad-accum and "
                            f"--meta-batch of at least {world} (now {args.train_batch} and {args.meta_batch})")
    if device.type == "cuda":                           # prm.pick_device: the GPU of this process's LOCAL_RANK
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():        # the toy demo's second run (the vanilla PRM) joins once
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if rank > 0:
            sys.stdout = open(os.devnull, "w")
    return rank, world, device


def await_torchrun_stop():
    """torchrun stops every process when one fails. Process 0 says what that means, once: SIGTERM is
    blocked in every thread (this runs before torch starts any) and awaited by one of its own, which
    runs even while the main thread waits in a collective that will never complete."""
    import threading

    def wait():
        signal.sigwait([signal.SIGTERM])
        run_stopped()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    threading.Thread(target=wait, daemon=True).start()


def run_stopped():
    """Process 0's one line when torchrun's run stops under it, then its exit (code 1)."""
    if prm.processes()[0] == 0:
        print("error: a process of this torchrun run stopped (it failed, was killed or interrupted), so the run "
              "stopped; the run directory keeps its last checkpoint: rerun the same command with --resume",
              file=sys.stderr, flush=True)
    os._exit(1)


def lost_process(e):
    """Whether an error is a collective that lost a process (gloo: the connection reset; nccl: a DistError)."""
    return isinstance(e, torch.distributed.DistError) or any(
        word in str(e) for word in ("Connection reset by peer", "Connection closed by peer", "gloo/transport"))


def shard_prm(model, device, world, keep_gathered=False):
    """FSDP2: each decoder layer, the vision tower, the value head and the rest (embeddings, norms)
    one unit each, whose parameters, gradients and optimizer states are split over the processes
    and gathered for its forward and backward. A unit in CPU memory moves to `device` as it is
    sharded, so a GPU never holds more than one unit whole. keep_gathered (--group-by-question): the
    units stay gathered from a forward until ShardedForward releases them (the shared prompt's KV
    cache carries gradients back into a layer after its own backward, which must still find it
    gathered and whose gradients FSDP2 then reduces as a second share): the whole PRM's weights on
    every GPU during a step, as ZeRO-2 holds them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    # Resharded after every forward, the root unit too (FSDP2 keeps the root gathered by default): the
    # hypergradient moves the sharded parameters between two forwards, which must gather them anew.
    # With keep_gathered, ShardedForward.release does it instead, after each backward or no-grad forward.
    shard = partial(fully_shard, mesh=init_device_mesh(device.type, (world,)), reshard_after_forward=not keep_gathered)
    # FSDP2 warns of every unit whose output is a view (the head's, of a 3-D input), in case a caller
    # changes it in place; the value head's output is only read (sigmoid), so the warning is noise.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for layer in model.backbone.get_decoder().layers:
        shard(layer)
    if model.family is not None:
        shard(getattr(model.backbone, model.family.vision_tower))
    shard(model.backbone)
    shard(model.head)
    if keep_gathered:                           # ShardedForward.release frees them after each backward
        model.backbone.set_reshard_after_backward(False)
        model.head.set_reshard_after_backward(False)


def from_process_0(x):
    """Process 0's x, on every process (x itself in a plain run)."""
    if torch.distributed.is_initialized():
        box = [x]
        torch.distributed.broadcast_object_list(box, 0)
        x = box[0]
    return x


def whole(t):
    """A tensor whole: gathered from the processes when it is sharded (every process must ask)."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def placed(t, like):
    """A whole tensor t placed as `like` is: this process's shard when `like` is sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(like, DTensor):
        return distribute_tensor(t.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return t.to(like.device)


# ==============================================================================================
# The command line
# ==============================================================================================

class Diverged(RuntimeError):
    """A non-finite loss or hypergradient: the run stops before the step, its last checkpoint kept.
    `level`: 'lower' (the PRM's loss) or 'upper' (the meta loss or the hypergradient)."""

    def __init__(self, what, level):
        super().__init__(what)
        self.level = level


def diverged_message(args, done, e):
    """What a user reads when a run diverges: what was non-finite and where, the flags that scale
    it, and what is kept with a command that works (--resume takes the same flags only)."""
    if e.level == "lower":
        flags = f"--lr (now {args.lr:g}), --weight-decay (now {args.weight_decay:g}) or --grad-clip (now {args.grad_clip:g})"
    else:
        flags = f"--meta-lr (now {args.meta_lr:g}) or --fd-radius (now {args.fd_radius:g})"
    state = os.path.join(args.out, "checkpoint", "state.json")
    at = prm.read_json_object(state).get("iteration") if os.path.isfile(state) else None
    kept = (f"its checkpoint at iteration {at} is kept: --resume continues from it with the same flags" if at else
            "no checkpoint was written yet")
    return (f"{e} at iteration {done + 1}; stopped before the step: {kept}. To change {flags}, rerun with the new "
            f"flags and --overwrite (or another --out)")


def main(argv=None):
    """Train the run the flags ask for (and, for the toy demo, the vanilla baseline after it)."""
    rank, world = prm.processes()
    if rank == 0 and world > 1:
        await_torchrun_stop()
    for args in runs(sys.argv[1:] if argv is None else list(argv)):
        bilevel(args)
    prm.leave_processes()
    return 0


def cli(argv=None):
    try:
        return prm.run_cli(main, argv, "rerun the same command with --resume")
    except Diverged as e:
        if prm.processes()[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if prm.processes()[1] > 1 and lost_process(e):
            run_stopped()
        raise


if __name__ == "__main__":
    prm.exit_process(cli())
