"""Monte Carlo step labels: for every step prefix of every CoT, K rollouts continue the CoT and

    p_i = (# rollouts from yhat_i that reach the right answer) / (# rollouts)

Reads   cots.jsonl   (gen_cots.py output)
Writes  labels.jsonl the cots fields + {"mc": [p_i per step], "rollouts": [rollouts per step]}
        appended and flushed record by record; a rerun skips labelled CoTs and drops a torn last line.

The last step's label is the CoT's own correctness (its answer is already written). Up to
--concurrency rollout requests are in flight across CoTs (one per step prefix), and records are
written as their CoTs complete; one process writes an output (a lock), and a rerun with other
labelling parameters (stored in OUT.params.json) stops instead of mixing records. Options: adaptive stopping (stop a prefix once
--min-rollouts agree), early stop after a prefix with p = 0 (later steps get 0), a step cap.

Toy world (after python gen_cots.py --toy):
    python mc_label.py
Real data, through a vLLM server:
    python mc_label.py --cots cots.jsonl --out labels.jsonl --policy openai --base-url http://localhost:8000/v1
"""

import os
import sys
import time
from dataclasses import dataclass

import prm


def label_steps(cot, K, min_rollouts, zero_stop, max_steps):
    """MC labels (mc, rollouts) for one CoT record, as a task for gen_cots.drive: it yields the
    rollout requests [(prompt, k)] it needs and is sent back their texts.

    All step prefixes are requested at once. With min_rollouts > 0, each prefix first gets
    min_rollouts; the prefixes whose rollouts all agree stop there, the others get the remaining
    K - min_rollouts in a second round. With zero_stop, prefixes are rolled out one after another
    instead, and once one has p = 0 the later steps are labelled 0 without rollouts (fewer
    rollouts, fewer requests in flight per CoT).
    """
    steps = cot["steps"]
    n = len(steps) if max_steps is None else min(len(steps), max_steps)
    prefixes = list(range(n - 1 if n == len(steps) else n))           # the last step is labelled by `correct`
    outcomes = {}

    def requests(indices, k, first):
        return [({"question": cot, "prefix": "\n".join(steps[:i + 1]), "first": first}, k) for i in indices]

    def score(indices, results):
        for i, texts in zip(indices, results):
            outcomes.setdefault(i, []).extend(
                prm.match_answer(prm.extract_answer(steps_text(steps, i, t)), cot["answer"],
                                      cot.get("choices")) for t in texts)

    def label(indices):                                               # a generator: yield from it
        first_k = min_rollouts if 0 < min_rollouts < K else K
        score(indices, (yield requests(indices, first_k, 0)))
        undecided = [i for i in indices if 0 < sum(outcomes[i]) < len(outcomes[i])]
        if first_k < K and undecided:
            score(undecided, (yield requests(undecided, K - first_k, first_k)))

    if zero_stop:
        for i in prefixes:
            yield from label([i])
            if sum(outcomes[i]) == 0:
                break
    elif prefixes:
        yield from label(prefixes)
    mc, counts = [], []
    for i in range(n):
        if i in outcomes:
            mc.append(sum(outcomes[i]) / len(outcomes[i]))
            counts.append(len(outcomes[i]))
        elif zero_stop and 0.0 in mc:
            mc.append(0.0)                                            # after a prefix with p = 0
            counts.append(0)
        else:
            mc.append(1.0 if cot["correct"] else 0.0)                 # the last step: the CoT's correctness
            counts.append(0)
    return mc, counts


def labelled_record(cot, K, min_rollouts, zero_stop, max_steps):
    """A task: the labels.jsonl record of one CoT (cut to its labelled steps with --max-steps)."""
    mc, counts = yield from label_steps(cot, K, min_rollouts, zero_stop, max_steps)
    if len(mc) < len(cot["steps"]):
        cot = dict(cot, steps=cot["steps"][:len(mc)])
    return dict(cot, mc=mc, rollouts=counts)


def steps_text(steps, i, continuation):
    """The full CoT text of prefix i plus a rollout (for answer extraction)."""
    return "\n".join(steps[:i + 1]) + continuation


@dataclass
class Labelling:
    """CoTs and rollouts"""
    cots: str = prm.option(None, "cots.jsonl (default: the toy world's toy/train_cots.jsonl)")
    out: str = prm.option(None, "labels.jsonl to append to (default: beside the CoTs)")
    rollouts: int = prm.option(16, "K: rollouts per step prefix (>= 1)", type=prm.number(int, 1, 10 ** 5))
    min_rollouts: int = prm.option(0, "adaptive stopping: stop a prefix after this many rollouts if they all agree "
                                   "(0: off; else 1 to K - 1)", type=prm.number(int, 0))
    zero_stop: bool = prm.option(False, "after a prefix with p = 0, label later steps 0 without rolling them out "
                                 "(prefixes then go to the policy one at a time)")
    max_steps: int = prm.option(None, "label at most this many steps per CoT (>= 1; default: all)",
                                type=prm.number(int, 1))


def main(argv=None):
    import gen_cots            # the policies that sampled the CoTs continue them: Policy, make_policy, drive only
    ap = prm.Parser(__doc__)
    for options in (Labelling, prm.InputFormat, gen_cots.Policy):
        prm.add_options(ap, options)
    args = ap.parse_args(argv)
    prm.one_process("mc_label.py", "for more GPUs, serve the policy with a serving engine (vLLM, SGLang: one server "
                    "over many GPUs) and label with --policy openai, many rollouts in flight (--concurrency)")
    if args.min_rollouts >= args.rollouts:
        ap.error(f"argument --min-rollouts: {args.min_rollouts} must be below --rollouts {args.rollouts} (or 0: off)")
    if args.cots is None:
        args.cots = os.path.join(prm.TOY_DIR, "train_cots.jsonl")
        if not os.path.isfile(args.cots):
            raise prm.DataError("no --cots given and no toy world: run python gen_cots.py --toy first", file=args.cots)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.cots)),
                                   os.path.basename(args.cots).replace("cots", "labels")
                                   if "cots" in os.path.basename(args.cots) else "labels.jsonl")
    prm.check_output(out, [args.cots])
    cots, skips = prm.read_cots(args.cots, "cots", **prm.reading(args))
    prm.check_unique(cots, lambda c: (c["id"], c["sample"]), "question id and sample")   # what a rerun skips by
    no_key = next((c for c in cots if not c["answer"].strip()), None)
    if no_key:
        raise prm.DataError("no answer key: Monte Carlo rollouts are scored against it", *no_key["_src"], "answer")
    policy = gen_cots.make_policy(args)
    if skips:
        print(f"{args.cots}: {prm.skip_report(skips, [c['id'] for c in cots])}; not labelled")
    t0, n_rollouts = time.perf_counter(), 0
    with prm.output_lock(out):
        prm.check_params(out, dict(policy.params, rollouts=args.rollouts, min_rollouts=args.min_rollouts,
                                   zero_stop=args.zero_stop, max_steps=args.max_steps))
        done = prm.done_records(out, lambda o: (o["id"], o["sample"]))
        prm.check_keys(done, cots, lambda c: (c["id"], c["sample"]), ("answer", "correct"))
        todo = [c for c in cots if (c["id"], c["sample"]) not in done]
        with open(out, "a", encoding="utf-8") as f, \
                prm.progress(total=len(cots), initial=len(cots) - len(todo), desc="mc_label", unit="cot") as bar:
            def write(record):
                nonlocal n_rollouts
                prm.append_jsonl(f, record)
                n_rollouts += sum(record["rollouts"])
                bar.update(1)
            tasks = (labelled_record(c, args.rollouts, args.min_rollouts, args.zero_stop, args.max_steps)
                     for c in todo)
            gen_cots.drive(policy, tasks, write, args.concurrency)
    seconds = time.perf_counter() - t0
    if not todo:
        print(f"nothing left to label: all {len(cots)} CoTs are in {out} already")
        return 0
    print(f"labels written to {out}: {len(todo)} CoTs, {n_rollouts} rollouts in {seconds:.1f} s "
          f"({prm.rate_text(n_rollouts / max(seconds, 1e-9))} rollouts/s)")
    return 0


if __name__ == "__main__":
    sys.exit(prm.run_cli(main))
