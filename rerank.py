"""Best-of-N reranking: pick the best of each question's N CoTs with one or more PRMs, with or
without answer keys.

Reads   --cots test_cots.jsonl (N CoTs per question, any format of the README's data section;
        `correct` and `answer` may be missing: the PRM picks where the answer is unknown)
        --prm RUN_OR_PRM_DIR [more]  (bilevel_train.py run directories or PRM directories)
Writes  --out DIR, always:
          scores.jsonl  one line per CoT: id, sample, domain and, for each PRM, its score A(V) and
                        step values V (null for a CoT skipped as longer than the PRM's max_length)
          picks.jsonl   one line per question and PRM: id, domain, prm, the chosen sample, its
                        predicted answer and score
        and, for the questions whose CoTs all carry `correct`: results.json, results.md (the
        table), accuracy_vs_n.png, and the step report where MC labels exist.

Questions are scored one at a time (the file is indexed by question, in any order), so a large test
set is never held in memory; a killed run resumes PRM by PRM, question by question. Under
`torchrun --nproc-per-node N rerank.py ...` each process scores every N-th question (one GPU each)
and process 0 merges them into the same outputs as one process.

For every question: score each CoT, A(V_1..V_n) with the PRM's aggregation (the one its upper loss
used, from prm.json; --aggregate overrides), keep the argmax. Reported per domain and overall:
  pass@1     mean correctness over all samples
  majority   self-consistency vote over the predicted answers
  PRM        best-of-N accuracy for each PRM given, side by side
  oracle     pass@N: some sample is correct
Ties (equal votes, exactly equal scores) count as the expected accuracy of a uniform choice among
the tied candidates; the CoT written as a pick is the lowest sample index. Also accuracy against N
for N = 1, 2, 4, ... (mean over seeded random subsets of each question's CoTs).

Toy demo (after python bilevel_train.py):
    python rerank.py
Real data:
    python rerank.py --cots test_cots.jsonl --prm runs/vanilla runs/dreamprm --out runs/rerank
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

import prm

TOY_TEST = "toy/test_labels.jsonl"     # the toy test CoTs with MC labels (python bilevel_train.py builds them)
TOY_PRMS = ["runs/toy-vanilla", "runs/toy"]


def select_best(scores):
    """Index of the best CoT per question. scores (Q, N), -inf where a question has no CoT (or an
    unscored one). Ties: lowest index."""
    return scores.argmax(-1)


def score_question(model, records, how, batch_size, shared_prefix):
    """Step values and A(V) for the CoTs of one question.

    shared_prefix: prm.shared_prefix_values (image and question encoded once); otherwise packed
    batches of batch_size CoTs (prm.step_values), on a CPU in forwards of at most
    prm.CPU_TOKENS_PER_THREAD tokens per thread (prm.token_batches). A CoT longer than the PRM's
    max_length is not scored. Returns (scores [float or None per CoT], values [list of step values or
    None per CoT]).
    """
    encoded = [model.encode(r) for r in records]
    idx = [i for i, e in enumerate(encoded) if model.fits(e)]
    scores, values = [None] * len(records), [None] * len(records)
    if shared_prefix:
        batches = [idx]
    else:
        chunks = [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
        batches = [[chunk[j] for j in group] for chunk in chunks
                   for group in prm.token_batches([encoded[i] for i in chunk], prm.scoring_budget(model.device))]
    with torch.no_grad():
        for batch in batches:
            if not batch:
                continue
            fn = prm.shared_prefix_values if shared_prefix else prm.step_values
            V, mask = fn(model, [encoded[i] for i in batch])             # (B, S)
            V = V.float()
            for b, (i, A) in enumerate(zip(batch, prm.aggregate(V, mask, how).tolist())):
                scores[i], values[i] = A, V[b][mask[b]].tolist()
    return scores, values


def first_error(xs, threshold):
    """Index of the first step below threshold, or -1 when there is none."""
    return next((i for i, x in enumerate(xs) if x < threshold), -1)


# What a file's step labels are, for the step report's title: people judged each step, or Monte
# Carlo rollouts estimated it.
HUMAN_LABELS = ("processbench", "prm800k", "visualprocessbench")
MC_LABELS = ("ours", "dreamprm", "mathshepherd", "visualprm400k")


def add_step_counts(counts, judged, records, values, threshold=0.25):
    """Add one question's CoTs to the step report's sums (`counts`: records with step labels and a
    score) and to the benchmark figures' CoTs (`judged`: {subset: [(values, labels)]}, the CoTs whose
    steps are judged right or wrong: a format other than ours, every label 0 or 1; see
    benchmark_report, which may choose its threshold from them)."""
    for r, v in zip(records, values):
        mc, fmt = r.get("mc"), r.get("_format", "ours")
        if not mc:
            continue
        if fmt != "ours" and all(p in (0.0, 1.0) for p in mc if p is not None):
            judged.setdefault(r["domain"], []).append((v, mc))
        if v is None:
            continue
        pairs = [(x, p) for x, p in zip(v, mc) if p is not None]
        counts["se"] += sum((x - p) ** 2 for x, p in pairs)
        counts["steps"] += len(pairs)
        labelled = [p if p is not None else 1.0 for p in mc]
        counts["hits"] += first_error(v, threshold) == first_error(labelled, threshold)
        counts["cots"] += 1
        counts["labels/" + ("human" if fmt in HUMAN_LABELS else "mc" if fmt in MC_LABELS else "file")] += 1
    return counts


def add_judged_counts(counts, v, mc, threshold):
    """Sums for benchmark_report of one judged CoT (v: its step values, None when it was too long to
    score). The step confusion counts, VisualProcessBench's way: true right/wrong x flagged (V <
    threshold) or not. The first-error hit, ProcessBench's way (Zheng et al., 2024, arXiv
    2412.06559, section 4.1: "a threshold above which steps are considered as correct", so a step
    at or below it is flagged): the prediction is the first flagged step among the labelled ones
    (neutral and unjudged steps add nothing), a hit when it equals the first wrong step (-1 for
    none). An unscored CoT counts in every denominator, as a miss."""
    label = next((i for i, p in enumerate(mc) if p == 0.0), -1)        # the first wrong step, -1 for none
    kind = "erroneous" if label >= 0 else "correct"
    counts[kind] += 1
    if v is None:
        counts["unscored"] += 1
        for p in mc:
            if p is not None:
                counts["right_flagged" if p == 1.0 else "wrong_passed"] += 1
        return
    for x, p in zip(v, mc):
        if p is not None:
            counts[("right" if p == 1.0 else "wrong") + ("_flagged" if x < threshold else "_passed")] += 1
    predicted = next((i for i, (x, p) in enumerate(zip(v, mc)) if p is not None and x <= threshold), -1)
    counts[kind + "_hits"] += predicted == label


def processbench_f1(counts):
    """ProcessBench (Zheng et al., 2024, arXiv 2412.06559, section 4.1): accuracy of the first wrong
    step found exactly on erroneous CoTs, of none flagged on correct CoTs, and their harmonic mean;
    None where a class is empty or both accuracies are 0 (its evaluation code gives nan there)."""
    err = counts["erroneous_hits"] / counts["erroneous"] if counts["erroneous"] else None
    ok = counts["correct_hits"] / counts["correct"] if counts["correct"] else None
    f1 = 2 * err * ok / (err + ok) if err is not None and ok is not None and err + ok > 0 else None
    return {"erroneous_accuracy": err, "correct_accuracy": ok, "f1": f1, "erroneous": counts["erroneous"],
            "correct": counts["correct"], "unscored": counts["unscored"]}


def benchmark_report(judged, threshold, rule="fixed"):
    """Step-level figures as the benchmarks publish them, over the judged CoTs (None if there are none).
    judged: {subset: [(values, labels)]} (add_step_counts); threshold: a number, the flag's value
    (`rule` says how it was chosen: best_threshold). VisualProcessBench (Wang et al., 2025, arXiv
    2503.10291): the F1 of telling right from wrong steps, for each class and their macro mean,
    neutral steps left out, over all steps. ProcessBench: its F1 per subset (processbench_f1), and
    the plain mean of the subsets' F1s (None if one is undefined): the paper's average when the
    file holds its four subsets."""
    sums = {}
    for name, cots in judged.items():
        sums[name] = Counter()
        for v, mc in cots:
            add_judged_counts(sums[name], v, mc, threshold)
    judged = sums
    total = sum(judged.values(), Counter())
    if not total["erroneous"] + total["correct"]:
        return None
    rf, rp, wf, wp = (total[k] for k in ("right_flagged", "right_passed", "wrong_flagged", "wrong_passed"))
    f1_right = 2 * rp / max(1, 2 * rp + wp + rf)
    f1_wrong = 2 * wf / max(1, 2 * wf + rf + wp)
    subsets = {name: processbench_f1(c) for name, c in sorted(judged.items())}
    f1s = [x["f1"] for x in subsets.values()]
    return {"threshold": threshold, "threshold_rule": rule, "f1_right": f1_right, "f1_wrong": f1_wrong,
            "macro_f1": (f1_right + f1_wrong) / 2,
            "steps": rf + rp + wf + wp, "subsets": subsets,
            "processbench_f1": None if None in f1s else sum(f1s) / len(f1s),
            "erroneous": total["erroneous"], "correct": total["correct"], "unscored": total["unscored"]}


PROCESSBENCH_SUBSETS = ("gsm8k", "math", "olympiadbench", "omnimath")


def best_threshold(cots):
    """ProcessBench's protocol for a PRM that gives scalar step values (its section 4.1): the
    threshold, among the step values observed on the judged CoTs of one subset, at which that
    subset's F1 is highest (the lowest such value on a tie). Vectorised over the candidates; the
    same figures as benchmark_report at each. Returns (threshold, its F1)."""
    labelled = [[x if p is not None else math.inf for x, p in zip(v, mc)] for v, mc in cots if v is not None]
    candidates = torch.tensor(sorted({x for row in labelled for x in row if x != math.inf}), dtype=torch.float64)
    first_wrong = torch.tensor([next((i for i, p in enumerate(mc) if p == 0.0), -1) for v, mc in cots if v is not None])
    n_err = sum(1 for _, mc in cots if 0.0 in mc)
    n_ok = len(cots) - n_err
    if not n_err or not n_ok or not len(candidates):
        return None, None
    V, _ = prm.pad_rows(labelled, math.inf, dtype=torch.float64)                  # (C, S), +inf: never flagged
    flagged = V[None] <= candidates[:, None, None]                                # (U, C, S)
    predicted = torch.where(flagged.any(-1), flagged.double().argmax(-1), -1)     # (U, C) first flagged step
    hits = predicted == first_wrong[None]                                         # (U, C)
    err = hits[:, first_wrong >= 0].sum(-1).double() / n_err                      # unscored CoTs: misses
    ok = hits[:, first_wrong < 0].sum(-1).double() / n_ok
    f1 = torch.where(err + ok > 0, 2 * err * ok / (err + ok).clamp(min=1e-12), -1.0)     # (U,)
    best = int(f1.argmax())
    return (float(candidates[best]), float(f1[best])) if f1[best] >= 0 else (None, None)


def resolve_threshold(spec, judged, prm_name):
    """--step-threshold as (the number, how it was chosen): as given, or 'best:SUBSET' searched on
    that subset's judged CoTs (best_threshold) and then used for every subset."""
    if not isinstance(spec, str):
        return spec, "fixed"
    name = spec.split(":", 1)[1]
    if name not in judged:
        raise prm.DataError(f"--step-threshold {spec}: the file holds no judged CoT of subset {name!r} (subsets: "
                            f"{', '.join(sorted(judged)) or 'none'})", field="--step-threshold")
    threshold, f1 = best_threshold(judged[name])
    if threshold is None:
        raise prm.DataError(f"--step-threshold {spec}: subset {name!r} needs erroneous and correct CoTs, scored, "
                            "for an F1 to choose by", field="--step-threshold")
    print(f"{prm_name}: step threshold {threshold:.6g}, the best F1 ({100 * f1:.1f}) on {name}, used for every subset")
    return threshold, f"the best F1 on {name} (ProcessBench's protocol)"


def threshold_spec(text):
    """--step-threshold: a number in [0, 1], or best:SUBSET."""
    if text.startswith("best:") and text[5:].strip():
        return "best:" + text[5:].strip()
    try:
        return prm.number(float, 0, 1)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; give a number in [0, 1], or best:SUBSET (best:gsm8k)") from None


def step_report(records, values, threshold=0.25, counts=None):
    """PRM step values against MC labels, on records that have them: the mean squared error over
    labelled steps, and how often the PRM finds the first wrong step. The first wrong step is the
    first whose value falls below `threshold`, by the same rule for the MC labels and for the PRM
    (-1 when there is none, e.g. a correct CoT: both -1 is a hit). `counts`: sums already added
    question by question (add_step_counts)."""
    counts = counts if counts is not None else add_step_counts(Counter(), {}, records, values, threshold)
    if not counts["cots"]:
        return None
    return {"step_mse": counts["se"] / max(1, counts["steps"]), "first_error_accuracy": counts["hits"] / counts["cots"],
            "cots": counts["cots"], "steps": counts["steps"], "threshold": threshold}


def question_metrics(cots, scores_by_prm):
    """For one question's CoTs: pass@1 (mean correctness), majority vote, each PRM's pick and the
    oracle, each as 0..1. scores_by_prm: {name: [score per CoT, None for a CoT not scored]}.
    Ties (equal votes, exactly equal scores) count as the expected accuracy of a uniform choice
    among the tied candidates, not as the earliest sample."""
    correct = [float(c["correct"]) for c in cots]
    out = {"pass@1": sum(correct) / len(cots),
           "majority": prm.uniform_choice(correct, prm.top_answers([c.get("pred", c.get("final", "")) for c in cots])),
           "oracle": max(correct)}
    for name, scores in scores_by_prm.items():
        s = [float("-inf") if x is None else x for x in scores]
        picked = any(x is not None for x in scores)          # a PRM that scored no CoT picks none: 0, not a tie
        out[name] = prm.uniform_choice(correct, [[i] for i, x in enumerate(s) if x == max(s)]) if picked else 0.0
    return out


def evaluate(questions, scores_by_prm, n_subsets, seed):
    """Accuracy per domain and overall (exact counts over questions), and accuracy against N (each
    question's N-subsets drawn with a seeded generator). questions: [(domain, [CoT with correct,
    pred])]; scores_by_prm: {name: [[score per CoT] per question]}."""
    rows, counts = defaultdict(lambda: defaultdict(float)), Counter()
    ns = [n for n in (2 ** k for k in range(12)) if n <= max(len(cots) for _, cots in questions)]
    curve = {name: {n: 0.0 for n in ns} for name in ["pass@1", "majority", "oracle"] + list(scores_by_prm)}
    rng = random.Random(seed)
    for q, (domain, cots) in enumerate(questions):
        scores = {name: s[q] for name, s in scores_by_prm.items()}
        for key in (domain, "overall"):
            counts[key] += 1
            for metric, v in question_metrics(cots, scores).items():
                rows[key][metric] += v
        for n in ns:
            repeats = n_subsets if n < len(cots) else 1
            for _ in range(repeats):
                pick = sorted(rng.sample(range(len(cots)), min(n, len(cots))))
                sub = {name: [s[i] for i in pick] for name, s in scores.items()}
                for metric, v in question_metrics([cots[i] for i in pick], sub).items():
                    curve[metric][n] += v / repeats
    table = {k: {m: v / counts[k] for m, v in r.items()} | {"questions": counts[k]} for k, r in rows.items()}
    curve = {name: {n: v / len(questions) for n, v in c.items()} for name, c in curve.items()}
    return table, curve


WEIGHTING_LABELS = {"domain": "DreamPRM", "fixed": "vanilla PRM", "instance-table": "DreamPRM-1.5 table",
                    "instance-net": "DreamPRM-1.5 net", "domain-instance": "domain x instance"}


def prm_label(path):
    """A PRM's column name: its training weighting and its folder, "DreamPRM (toy)"; a PRM
    directory without its run's config.json is named by its folder."""
    folder = os.path.basename(os.path.normpath(path))
    config = os.path.join(path, "config.json")
    try:
        with open(config) as f:
            weighting = json.load(f).get("weighting")
    except (OSError, ValueError, AttributeError):
        return folder
    return f"{WEIGHTING_LABELS.get(weighting, weighting)} ({folder})" if weighting else folder


def markdown(table, columns):
    domains = sorted(k for k in table if k != "overall")
    keys = (domains if len(domains) > 1 else []) + ["overall"]          # one domain: its row is the overall
    lines = ["| domain | questions | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for k in keys:
        lines.append(f"| {k} | {table[k]['questions']} | " + " | ".join(f"{100 * table[k][c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)


def plot_curve(curve, path):
    """accuracy_vs_n.png: accuracy against N (N = 1, 2, 4, ... evenly spaced)."""
    ns = sorted(next(iter(curve.values())))
    series = {name: [(i, c[n]) for i, n in enumerate(ns)] for name, c in curve.items()}
    legend = {name: f"{name} {100 * c[ns[-1]]:.1f}%" for name, c in curve.items()}
    prm.line_plot(path, "Best-of-N accuracy against N", series, [(i, str(n)) for i, n in enumerate(ns)],
                  1.0, lambda y: f"{100 * y:.0f}%", legend, x_title="N, CoTs per question",
                  y_title="accuracy")


def score_with(name, path, questions, load, args, device, cots_digest, rank=0, world=1):
    """Score the questions with one PRM into a part file, one line per question, resumable: a rerun
    continues after the last complete line. Under torchrun, process `rank` of `world` scores
    questions rank, rank + world, ... into a part file of its own. Returns (part file, aggregation used)."""
    model = prm.PRM.from_pretrained(path, device=device).eval()
    how = args.aggregate or model.aggregation
    # The part file is named by everything its lines depend on, contents included (the test file's
    # bytes, the PRM's weights and settings), so a changed input or a retrained PRM starts afresh.
    tag = json.dumps([cots_digest, prm.file_digest(prm.prm_directory(path)), how, args.no_shared_prefix,
                      args.batch_size, args.format, args.domain, args.image_root, args.correct_from])
    share = "" if world == 1 else f"-{rank}of{world}"
    part = os.path.join(args.out, f".scores-{name}-{hashlib.sha1(tag.encode()).hexdigest()[:12]}{share}.jsonl")
    done = len(list(prm.iter_jsonl(part, drop_torn_tail=True))) if os.path.isfile(part) else 0
    prm.drop_torn_tail(part)
    mine = range(rank + done * world, len(questions), world)
    with open(part, "a", encoding="utf-8") as f:
        for q in prm.progress(mine, initial=done, total=len(range(rank, len(questions), world)), desc=f"score {name}"):
            scores, values = score_question(model, load(questions[q][1]), how, args.batch_size,
                                            not args.no_shared_prefix)
            prm.append_jsonl(f, {"q": q, "scores": scores, "values": values})
    del model
    return part, how


def write_outputs(questions, load, parts, names, args):
    """Merge the PRMs' part files (each PRM's: one, or one per torchrun process, which scored every
    world-th question), question by question, into scores.jsonl and picks.jsonl; collect what the
    evaluation needs (questions whose CoTs all have `correct`) and the step report's sums."""
    labelled, scores_by_prm = [], {n: [] for n in names}
    step_counts, judged = {n: Counter() for n in names}, {n: {} for n in names}
    unlabelled = long_cots = 0
    files = [[open(p, encoding="utf-8") for p in shares] for shares in parts]
    scores_tmp, picks_tmp = (os.path.join(args.out, f"{n}.jsonl.tmp") for n in ("scores", "picks"))
    with open(scores_tmp, "w", encoding="utf-8") as fs, open(picks_tmp, "w", encoding="utf-8") as fp:
        for q, ((domain, qid), entries) in enumerate(questions):
            records = load(entries)
            rows = [json.loads(f[q % len(f)].readline()) for f in files]    # this question's line from each PRM
            for i, r in enumerate(records):
                fs.write(json.dumps({"id": r["id"], "sample": r["sample"], "domain": r["domain"],
                                     "prms": {n: {"score": row["scores"][i], "steps": row["values"][i]}
                                              for n, row in zip(names, rows)}}, ensure_ascii=False) + "\n")
            long_cots += sum(s is None for s in rows[0]["scores"])
            for n, row in zip(names, rows):
                s = torch.tensor([float("-inf") if x is None else x for x in row["scores"]])
                best = int(select_best(s[None])[0]) if any(x is not None for x in row["scores"]) else None
                pick = records[best] if best is not None else None
                fp.write(json.dumps({"id": qid, "domain": domain, "prm": n,
                                     "sample": pick["sample"] if pick else None,
                                     "pred": pick.get("pred", pick.get("final", "")) if pick else None,
                                     "score": row["scores"][best] if pick else None}, ensure_ascii=False) + "\n")
                add_step_counts(step_counts[n], judged[n], records, row["values"])
            if all(isinstance(r.get("correct"), bool) for r in records):
                labelled.append((domain, [{"correct": r["correct"], "pred": r.get("pred", r.get("final", ""))}
                                          for r in records]))
                for n, row in zip(names, rows):
                    scores_by_prm[n].append(row["scores"])
            else:
                unlabelled += 1
    for f in (f for shares in files for f in shares):
        f.close()
    os.replace(scores_tmp, os.path.join(args.out, "scores.jsonl"))
    os.replace(picks_tmp, os.path.join(args.out, "picks.jsonl"))
    for p in (p for shares in parts for p in shares):
        os.remove(p)
    return labelled, scores_by_prm, step_counts, judged, unlabelled, long_cots


@dataclass
class Options:
    """Reranking"""
    cots: str = prm.option(TOY_TEST, "test CoTs, N per question (correct and answer optional)")
    names: str = prm.option("", "comma-separated column names for the PRMs (default: folder names)")
    aggregate: str = prm.option(None, "aggregation function A (default: each PRM's own, from its prm.json)",
                                choices=prm.AGGREGATIONS)
    out: str = prm.option("runs/rerank", "output folder")
    image_root: str = prm.option(None, "folder image paths are relative to")
    batch_size: int = prm.option(16, "CoTs per scoring forward (with --no-shared-prefix; >= 1)",
                                 type=prm.number(int, 1, 1 << 16))
    no_shared_prefix: bool = prm.option(False, "score in packed batches instead of encoding each question's image "
                                        "and text once (same numbers, slower)")
    subsets: int = prm.option(20, "random subsets per N for accuracy against N (>= 1)", type=prm.number(int, 1, 10 ** 5))
    seed: int = prm.option(0, "seed of the subsets (>= 0)", type=prm.number(int, 0, 2 ** 31 - 1))
    step_threshold: float = prm.option(0.5, "the benchmarks' step-level figures flag a step as wrong when its value V "
                                       "is below this (VisualProcessBench), at or below it (ProcessBench); "
                                       "best:SUBSET takes, for each PRM, the threshold with the best F1 on that "
                                       "subset (ProcessBench's protocol: best:gsm8k) for every subset",
                                       type=threshold_spec)
    device: str = prm.option("auto", "auto, cpu, cuda")
    # last: from here on in this class body the name prm is this field, no longer the module
    prm: list = prm.option(None, "PRM or run directories (default: the toy runs present)", nargs="*")


def parse_args(argv):
    ap = prm.Parser(__doc__)
    for options in (Options, prm.InputFormat):
        prm.add_options(ap, options)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rank, world = prm.join_processes()          # torchrun: each process scores every world-th question
    device = prm.pick_device(args.device)       # under torchrun: the GPU of this process's LOCAL_RANK
    if args.prm is None and args.cots != TOY_TEST:
        raise prm.DataError("give the PRMs to compare (--prm DIR ...); the default PRMs are the toy demo's, for its "
                            "test set only", field="--prm")
    prms = args.prm if args.prm is not None else [p for p in TOY_PRMS if os.path.isdir(p)]
    if not os.path.isfile(args.cots):
        raise prm.DataError("no such file (for the toy demo run python bilevel_train.py first)", file=args.cots)
    if not prms:
        raise prm.DataError("no PRM given (--prm DIR ...) and no toy runs found: run python bilevel_train.py first")
    names = [n.strip() for n in args.names.split(",") if n.strip()] or [prm_label(p) for p in prms]
    if len(names) != len(prms) or len(set(names)) != len(names):
        raise prm.DataError(f"{len(prms)} PRMs need as many distinct names, got {names}", field="--names")
    prm.check_writable(args.out)                                # before any scoring, not after
    questions, skips, load = prm.index_questions(args.cots, "test", **prm.reading(args))
    if skips and rank == 0:
        print(f"{args.cots}: {prm.skip_report(skips, [qid for (_, qid), _ in questions])}")
    if not questions:
        raise prm.DataError("no CoTs with steps", file=args.cots)
    subset = args.step_threshold.split(":", 1)[1] if isinstance(args.step_threshold, str) else None
    if subset is not None and subset not in {domain for (domain, _), _ in questions}:
        raise prm.DataError(f"--step-threshold {args.step_threshold}: no CoT of subset {subset!r} in the file (subsets: "
                            f"{', '.join(sorted({d for (d, _), _ in questions}))})", file=args.cots)
    parts, aggregations, cots_digest = [], {}, prm.file_digest(args.cots)
    # One rerank.py per --out: under torchrun process 0 holds the lock, and merges once all have scored.
    with prm.output_lock(os.path.join(args.out, "scores.jsonl")) if rank == 0 else contextlib.nullcontext():
        prm.barrier()
        for name, path in zip(names, prms):
            part, aggregations[name] = score_with(name, path, questions, load, args, device, cots_digest, rank, world)
            parts.append([part.replace(f"-{rank}of{world}.", f"-{k}of{world}.") for k in range(world)])
        prm.barrier()                            # every process's part files are whole
        if rank > 0:
            prm.leave_processes()
            return 0
        labelled, scores_by_prm, step_counts, judged, unlabelled, long_cots = write_outputs(questions, load, parts,
                                                                                            names, args)
    if long_cots:
        print(f"{long_cots} CoTs longer than the PRM's max_length: not scored (null in scores.jsonl)")
    if long_cots == sum(len(entries) for _, entries in questions):
        raise prm.DataError("no CoT fits the PRM's max_length (prm.json): nothing was scored, no accuracy to report",
                            file=args.cots)

    write_report(args, names, prms, aggregations, labelled, scores_by_prm, step_counts, judged,
                 dict(skipped=len(skips), not_scored_too_long=long_cots, unlabelled_questions=unlabelled))
    prm.leave_processes()
    return 0


def write_report(args, names, prms, aggregations, labelled, scores_by_prm, step_counts, judged, counts):
    """results.json, results.md and accuracy_vs_n.png: best of N against the baselines (questions
    whose CoTs all carry `correct`), the step report against the file's step labels, and the
    benchmarks' step-level figures where steps are judged right or wrong."""
    steps = {n: step_report(None, None, counts=step_counts[n]) for n in names}
    judged = {n: benchmark_report(judged[n], *resolve_threshold(args.step_threshold, judged[n], n)) if judged[n]
              else None for n in names}
    written = f"written to {args.out}/: scores.jsonl (one line per CoT), picks.jsonl (one line per question and PRM)"
    if not labelled:
        print("no question has `correct` on every CoT: no accuracy table")
        if not any(judged.values()):
            print(written)
            return
    elif counts["unlabelled_questions"]:
        print(f"{counts['unlabelled_questions']} questions without `correct` on every CoT: left out of the table")
    table, curve = evaluate(labelled, scores_by_prm, args.subsets, args.seed) if labelled else ({}, {})
    md = markdown(table, ["pass@1", "majority"] + names + ["oracle"]) if labelled else ""
    if labelled and any(steps.values()):
        md += f"\n\nStep level, against {labels_title(step_counts)}:\n\n| PRM | step MSE | first wrong step found |\n"
        md += "|---|---:|---:|\n" + "\n".join(f"| {n} | {s['step_mse']:.4f} | {100 * s['first_error_accuracy']:.1f}% |"
                                           for n, s in steps.items() if s)
    if any(judged.values()):
        md += "\n\n" + benchmark_markdown(judged)
    prm.write_json_atomic(os.path.join(args.out, "results.json"),
                          {"table": table, "accuracy_vs_n": curve, "step_level": steps, "benchmark_step_level": judged,
                           "aggregate": aggregations, "prms": dict(zip(names, prms)), "cots": args.cots, **counts})
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md.strip("\n") + "\n")
    if curve:
        plot_curve(curve, os.path.join(args.out, "accuracy_vs_n.png"))
    print(written + ", results.json, results.md" + (", accuracy_vs_n.png" if curve else ""))
    print(md.strip("\n"))


def labels_title(step_counts):
    """What the step report compares with, named by what the labels are."""
    kinds = {k for c in step_counts.values() for k in c if k.startswith("labels/")}
    return {frozenset({"labels/human"}): "the human step labels", frozenset({"labels/mc"}): "the MC labels"}.get(
        frozenset(kinds), "the file's step labels")


def benchmark_markdown(judged):
    """The benchmark figures' tables: VisualProcessBench's macro F1 per PRM, then ProcessBench's
    accuracies and F1 per subset and their mean (the paper's average when all four of its subsets
    are in the file). '-' marks a figure that is undefined (no CoT of a class, or both accuracies 0)."""
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    subsets = sorted({name for b in judged.values() if b for name in b["subsets"]})
    mean = "average of its four subsets" if set(PROCESSBENCH_SUBSETS) <= set(subsets) else \
        f"mean of the {len(subsets)} subset{'s' if len(subsets) > 1 else ''} in this file"
    lines = ["Step level as the benchmarks report it (VisualProcessBench: a step is flagged wrong when V < the "
             "threshold; ProcessBench: when V <= it, as steps above it count as correct; an unscored CoT counts as "
             "a miss):", "",
             f"| PRM | threshold | judged steps | macro F1 (VisualProcessBench) | ProcessBench F1, {mean} |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {n} | {b['threshold']:.6g} ({b['threshold_rule']}) | {b['steps']} | {pct(b['macro_f1'])} | "
              f"{pct(b['processbench_f1'])} |" for n, b in judged.items() if b]
    lines += ["", "ProcessBench per subset:", "",
              "| PRM | subset | erroneous CoTs | first error found | correct CoTs | none flagged | F1 | unscored |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {name} | {x['erroneous']} | {pct(x['erroneous_accuracy'])} | {x['correct']} | "
              f"{pct(x['correct_accuracy'])} | {pct(x['f1'])} | {x['unscored']} |"
              for n, b in judged.items() if b for name, x in b["subsets"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    prm.exit_process(prm.run_cli(main))
