"""Best-of-N reranking: pick the best of each question's N CoTs with one or more PRMs.

Reads   --cots test_cots.jsonl (N CoTs per question; our JSONL or the published meta.json)
        --prm RUN_OR_PRM_DIR [more]  (bilevel_train.py run directories or PRM directories)
Writes  --out DIR: results.json, results.md (the table), accuracy_vs_n.png

For every question: score each CoT, A(V_1..V_n) with the chosen aggregation (default the paper's
mean_logit), keep the argmax. Reported per domain and overall, counts exact:
  pass@1     mean correctness over all samples
  majority   self-consistency vote over the predicted answers
  PRM        best-of-N accuracy for each PRM given, side by side
  (ties, equal votes or exactly equal scores, count as the expected accuracy of a uniform choice
  among the tied candidates; the CoT written as a pick is the lowest sample index)
  oracle     pass@N: some sample is correct
and accuracy against N for N = 1, 2, 4, ... (mean over seeded random subsets of each question's CoTs).

Toy demo (after python bilevel_train.py):
    python rerank.py
Real data:
    python rerank.py --cots test_cots.jsonl --prm runs/vanilla runs/dreamprm --out runs/rerank
"""

import os
import random
import sys
from collections import Counter, defaultdict

import torch
from tqdm import tqdm

import gen_cots
import prm

TOY_TEST = os.path.join(gen_cots.TOY_DIR, "test_labels.jsonl")   # the toy test CoTs with MC labels
TOY_PRMS = ["runs/toy-vanilla", "runs/toy"]


def select_best(scores, mask=None):
    """Index of the best CoT per question. scores (Q, N); mask (Q, N) marks real CoTs. Ties: lowest index."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.argmax(-1)


def top_answers(preds):
    """The most-voted answers (normalized), each as the indices of its CoTs, in first-seen order:
    several lists when the vote is tied."""
    keys = [gen_cots.normalize(p) for p in preds]
    counts = Counter(keys)                                       # insertion order: first seen first
    best = max(counts.values())
    return [[i for i, k in enumerate(keys) if k == answer] for answer, n in counts.items() if n == best]


def majority_vote(preds):
    """The CoT a self-consistency vote picks: the first CoT of the first most-voted answer."""
    return top_answers(preds)[0][0]


def uniform_choice(correct, groups):
    """Expected accuracy of a uniform choice among tied candidates: each group (a tied answer, or a
    tied CoT) is equally likely and scores the mean correctness of its CoTs."""
    return sum(sum(correct[i] for i in g) / len(g) for g in groups) / len(groups)


def group_questions(records, key=lambda r: r):
    """{(domain, question id): [items in file order]}; key(item) gives an item's record."""
    groups = defaultdict(list)
    for item in records:
        r = key(item)
        groups[(r["domain"], r["id"])].append(item)
    return groups


def score_cots(model, records, how, batch_size=16, shared_prefix=True):
    """Step values and A(V) for each record.

    shared_prefix: the CoTs of one question go through prm.shared_prefix_values (image and question
    encoded once); otherwise packed batches of batch_size CoTs (prm.step_values).
    Returns (scores [float per record], values [list of step values per record]).
    """
    if shared_prefix:
        groups = [[i for i, _ in g] for g in group_questions(list(enumerate(records)), key=lambda x: x[1]).values()]
    else:
        groups = [list(range(i, min(i + batch_size, len(records)))) for i in range(0, len(records), batch_size)]
    scores, values = [None] * len(records), [None] * len(records)
    with torch.no_grad():
        for idx in tqdm(groups, desc="score", leave=False, dynamic_ncols=True):
            encoded = [model.encode(records[i]) for i in idx]
            fn = prm.shared_prefix_values if shared_prefix else prm.step_values
            V, mask = fn(model, encoded)                                          # (B, S)
            V = V.float()
            for b, (i, A) in enumerate(zip(idx, prm.aggregate(V, mask, how).tolist())):
                scores[i], values[i] = A, V[b][mask[b]].tolist()
    return scores, values


def first_error(xs, threshold):
    """Index of the first step below threshold, or -1 when there is none."""
    return next((i for i, x in enumerate(xs) if x < threshold), -1)


def step_report(records, values, threshold=0.25):
    """PRM step values against MC labels, on records that have them: the mean squared error over
    labelled steps, and how often the PRM finds the first wrong step. The first wrong step is the
    first whose value falls below `threshold`, by the same rule for the MC labels and for the PRM
    (-1 when there is none, e.g. a correct CoT: both -1 is a hit)."""
    se, n_steps, hits, n_cots = 0.0, 0, 0, 0
    for r, v in zip(records, values):
        mc = r.get("mc")
        if not mc:
            continue
        pairs = [(x, p) for x, p in zip(v, mc) if p is not None]
        se += sum((x - p) ** 2 for x, p in pairs)
        n_steps += len(pairs)
        labelled = [p if p is not None else 1.0 for p in mc]
        hits += first_error(v, threshold) == first_error(labelled, threshold)
        n_cots += 1
    if not n_cots:
        return None
    return {"step_mse": se / max(1, n_steps), "first_error_accuracy": hits / n_cots, "cots": n_cots,
            "steps": n_steps, "threshold": threshold}


def question_metrics(cots, scores_by_prm):
    """For one question's CoTs: pass@1 (mean correctness), majority vote, each PRM's pick and the
    oracle, each as 0..1. Ties (equal votes, exactly equal scores) count as the expected accuracy
    of a uniform choice among the tied candidates, not as the earliest sample."""
    correct = [float(c["correct"]) for c in cots]
    out = {"pass@1": sum(correct) / len(cots),
           "majority": uniform_choice(correct, top_answers([c.get("pred", c.get("final", "")) for c in cots])),
           "oracle": max(correct)}
    for name, scores in scores_by_prm.items():
        s = [scores[id(c)] for c in cots]
        out[name] = uniform_choice(correct, [[i] for i, x in enumerate(s) if x == max(s)])
    return out


def evaluate(groups, scores_by_prm, n_subsets=20, seed=0):
    """Accuracy per domain and overall (exact counts over questions), and accuracy against N
    (each question's N-subsets drawn with a seeded generator). scores_by_prm: {name: {id(record): score}}."""
    rows, counts = defaultdict(lambda: defaultdict(float)), Counter()
    ns = [n for n in (2 ** k for k in range(12)) if n <= max(len(g) for g in groups.values())]
    curve = {name: {n: 0.0 for n in ns} for name in ["pass@1", "majority", "oracle"] + list(scores_by_prm)}
    rng = random.Random(seed)
    for (domain, _), cots in groups.items():
        for key in (domain, "overall"):
            counts[key] += 1
            for metric, v in question_metrics(cots, scores_by_prm).items():
                rows[key][metric] += v
        for n in ns:
            repeats = n_subsets if n < len(cots) else 1
            for _ in range(repeats):
                subset = [cots[i] for i in sorted(rng.sample(range(len(cots)), min(n, len(cots))))]
                for metric, v in question_metrics(subset, scores_by_prm).items():
                    curve[metric][n] += v / repeats
    table = {k: {m: v / counts[k] for m, v in r.items()} | {"questions": counts[k]} for k, r in rows.items()}
    curve = {name: {n: v / len(groups) for n, v in c.items()} for name, c in curve.items()}
    return table, curve


def markdown(table, columns):
    keys = sorted(k for k in table if k != "overall") + ["overall"]
    lines = ["| domain | questions | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for k in keys:
        lines.append(f"| {k} | {table[k]['questions']} | " + " | ".join(f"{100 * table[k][c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)


def plot_curve(curve, path):
    """accuracy_vs_n.png: accuracy against N (N = 1, 2, 4, ... evenly spaced)."""
    ns = sorted(next(iter(curve.values())))
    series = {name: [(i, c[n]) for i, n in enumerate(ns)] for name, c in curve.items()}
    legend = {name: f"{name} {100 * c[ns[-1]]:.1f}%" for name, c in curve.items()}
    prm.line_plot(path, "accuracy against N (best of N)", series, [(i, str(n)) for i, n in enumerate(ns)],
                  1.0, lambda y: f"{100 * y:.0f}%", legend)


def main(argv=None):
    ap = prm.Parser(__doc__)
    ap.add_argument("--cots", default=TOY_TEST, help="test CoTs, N per question")
    ap.add_argument("--prm", nargs="*", default=None, help="PRM or run directories (default: the toy runs present)")
    ap.add_argument("--names", default="", help="comma-separated column names for the PRMs (default: folder names)")
    ap.add_argument("--aggregate", choices=prm.AGGREGATIONS, default="mean_logit", help="aggregation function A")
    ap.add_argument("--out", default="runs/rerank", help="output folder")
    ap.add_argument("--image-root", default=None, help="folder image paths are relative to")
    prm.add_format_args(ap)
    ap.add_argument("--batch-size", type=prm.number(int, 1), default=16, help="CoTs per scoring forward (with "
                    "--no-shared-prefix; >= 1)")
    ap.add_argument("--no-shared-prefix", action="store_true", help="score in packed batches instead of encoding "
                    "each question's image and text once (same numbers, slower)")
    ap.add_argument("--subsets", type=prm.number(int, 1), default=20, help="random subsets per N for accuracy "
                    "against N (>= 1)")
    ap.add_argument("--seed", type=prm.number(int, 0), default=0, help="seed of the subsets (>= 0)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    args = ap.parse_args(argv)
    device = prm.pick_device(args.device)
    prms = args.prm if args.prm is not None else [p for p in TOY_PRMS if os.path.isdir(p)]
    if not os.path.isfile(args.cots):
        raise prm.DataError("no such file (for the toy demo run python bilevel_train.py first)", file=args.cots)
    prm.check_writable(args.out)                                # before any scoring, not after
    records, skips = prm.read_cots(args.cots, "cots", args.image_root, args.format, args.domain)
    if not prms:
        raise prm.DataError("no PRM given (--prm DIR ...) and no toy runs found: run python bilevel_train.py first")
    if skips:
        print(f"{args.cots}: {prm.skip_report(records, skips)}")
    if not records:
        raise prm.DataError("no CoTs with steps", file=args.cots)
    groups = group_questions(records)
    names = [n for n in args.names.split(",") if n] or [os.path.basename(os.path.normpath(p)) for p in prms]
    scores_by_prm, steps = {}, {}
    for name, path in zip(names, prms):
        model = prm.PRM.from_pretrained(path).to(device).eval()
        s, values = score_cots(model, records, args.aggregate, args.batch_size, not args.no_shared_prefix)
        scores_by_prm[name] = {id(r): x for r, x in zip(records, s)}
        steps[name] = step_report(records, values)
    table, curve = evaluate(groups, scores_by_prm, args.subsets, args.seed)
    columns = ["pass@1", "majority"] + names + ["oracle"]
    md = markdown(table, columns)
    if any(steps.values()):
        md += "\n\nStep level, against the MC labels:\n\n| PRM | step MSE | first wrong step found |\n|---|---:|---:|\n"
        md += "\n".join(f"| {n} | {s['step_mse']:.4f} | {100 * s['first_error_accuracy']:.1f}% |"
                        for n, s in steps.items() if s)
    prm.write_json_atomic(os.path.join(args.out, "results.json"),
                          {"table": table, "accuracy_vs_n": curve, "step_level": steps, "aggregate": args.aggregate,
                           "prms": dict(zip(names, prms)), "cots": args.cots, "skipped": len(skips)})
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    plot_curve(curve, os.path.join(args.out, "accuracy_vs_n.png"))
    print(md)
    print(f"written to {args.out}/ (results.json, results.md, accuracy_vs_n.png)")
    return 0


if __name__ == "__main__":
    sys.exit(prm.run_cli(main))
