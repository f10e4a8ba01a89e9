"""This project side by side with TRL's PRM trainer: training and scoring speed, peak memory and
step quality, on the same backbone, the same data and the same token ids, in one run.

TRL is never a dependency of this project: this script runs only where TRL 1.13.0 (the last
release that ships PRMTrainer; 1.14.0 removed it) is installed, in an environment of its own:

    python3 -m venv venv-trl
    venv-trl/bin/pip install torch==2.13.0 && venv-trl/bin/pip install -r requirements.txt
    venv-trl/bin/pip install trl==1.13.0 accelerate datasets
    venv-trl/bin/python tests/bench_trl.py                 # about 20 minutes on 2 cores

What is compared (every ratio is project / TRL; above 1 the project is faster or larger):
- Backbone: one random Qwen2-VL of 9.8 M parameters (tests/bench.py --size small), written once
  and loaded by both. transformers has no Qwen2-VL token-classification class, so TRL's model is
  that backbone with a Linear(hidden, 2) on every token and cross-entropy on the labelled tokens
  (what transformers' generic ...ForTokenClassification classes are).
- Data: the toy world (gen_cots.py --toy, mc_label.py) made text-only, as TRL's PRM trainer takes
  no images (the numbers an image holds are said in the question); binary step labels mc >= 0.5
  for both; no final-answer line (--final-answer drop), so both read the same step text. The prompt
  is the chat template around the question, the same token ids in both (checked). Two prompts:
  short (the question) and long (a fixed context before it, about a 2B Qwen2-VL image prompt).
- Training: TRL's PRMTrainer.train() against bilevel_train.py's own loop: vanilla packed
  (--weighting fixed), vanilla shared-prefix (--group-by-question) and DreamPRM (--weighting
  domain, U = 5) packed and shared-prefix. fp32, batch 8, constant lr, no gradient clipping and no
  checkpointing (TRL's defaults differ there), AdamW with weight decay 0 (torch's fused kernel on
  both sides), one thread each. The five runs live
  at once, one process each, and take turns of one outer iteration (U optimizer steps) while the
  others wait, the order reversed every other cycle: the systems run a few seconds apart on a
  noisy machine, and each process's peak RSS is its own. The first turns are warm-up.
- Scoring: the N = 8 CoTs of a test question, the ways timed in turns in this process, tokens
  made before timing: TRL's way (one forward per CoT, P(correct) at each step's separator)
  against the project's packed forward (one for the N CoTs, and in rerank.py's CPU batches of
  prm.CPU_TOKENS_PER_THREAD tokens per thread) and shared-prefix scoring.
- Quality: the short-prompt training runs' PRMs (the same steps for all) scored on the toy test
  labels: step accuracy at 0.5, step AUC, MSE and the mean value beside the positive rate.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TRL_VERSION = "1.13.0"
INSTALL = ("this bench needs TRL {0} (the last release with PRMTrainer), never a dependency of this project; in an "
           "environment of its own:\n  python3 -m venv venv-trl\n  venv-trl/bin/pip install torch==2.13.0 && "
           "venv-trl/bin/pip install -r requirements.txt\n  venv-trl/bin/pip install trl=={0} accelerate datasets\n  "
           "venv-trl/bin/python tests/bench_trl.py").format(TRL_VERSION)
CONTEXT = ("The image shows a red circle on the left and a blue square on the right of a yellow triangle; the "
           "largest shape is green and the smallest is at the top; count the digits in each shape and check the "
           "number in the bottom box carefully.").split()
# The training runs of the ring: TRL first, then the project's four.
CONFIGS = [("trl", "packed", "fixed"), ("project", "packed", "fixed"), ("project", "shared", "fixed"),
           ("project", "packed", "domain"), ("project", "shared", "domain")]


def quiet():
    for k, v in dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1",
                     TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
                     DISABLE_MLFLOW_INTEGRATION="TRUE").items():
        os.environ.setdefault(k, v)


def require_trl():
    try:
        import trl
        from trl.experimental.prm import PRMTrainer  # noqa: F401
    except ImportError:
        raise SystemExit(f"TRL is not installed here: {INSTALL}")
    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"TRL {trl.__version__} is installed: {INSTALL}")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024                # KiB on Linux


# ----------------------------------------------------------------------------------------------
# The backbone and the data, in both formats
# ----------------------------------------------------------------------------------------------

def text_question(r):
    """The toy question made text-only: what the image holds is said in words."""
    toy = r.get("toy") or {}
    return f"The image shows the numbers {toy['a']} and {toy['b']}. {r['question']}" \
        if "in the image" in r["question"] and "a" in toy else r["question"]


def prepare(work, long_prompt):
    """WORK/backbone, WORK/toy (through the project's own scripts), WORK/data/{short,long}/ with
    project_{train,meta,test}.jsonl and trl_{train,test}.jsonl; returns what the data holds."""
    import prm
    from transformers import AutoTokenizer
    backbone, toy = os.path.join(work, "backbone"), os.path.join(work, "toy")
    prm.save_tiny_backbone(backbone, seed=0, hidden_size=512, layers=4, heads=8)      # bench.py --size small
    if not os.path.isfile(os.path.join(toy, "test_labels.jsonl")):
        run = lambda *a: subprocess.run([sys.executable, *a], check=True, stdout=subprocess.DEVNULL)  # noqa: E731
        run(os.path.join(ROOT, "gen_cots.py"), "--toy", "--toy-dir", toy)
        for split in ("train", "test"):
            run(os.path.join(ROOT, "mc_label.py"), "--cots", os.path.join(toy, f"{split}_cots.jsonl"),
                "--out", os.path.join(toy, f"{split}_labels.jsonl"))
    tok = AutoTokenizer.from_pretrained(backbone)
    train, meta, test = (read_jsonl(os.path.join(toy, f)) for f in ("train_labels.jsonl", "meta_cots.jsonl",
                                                                     "test_labels.jsonl"))
    longest = max(len(prm.encode_prompt(tok, text_question(r))) for r in train + meta + test)
    context = []
    while len(tok(" ".join(context), add_special_tokens=False)["input_ids"]) < long_prompt - longest:
        context.append(CONTEXT[len(context) % len(CONTEXT)])
    info = {}
    for prompt, lead in (("short", ""), ("long", " ".join(context) + "\n")):
        d = os.path.join(work, "data", prompt)

        def ours(r, labels=True):
            out = {k: r[k] for k in ("id", "domain", "answer", "sample", "steps", "final", "pred", "correct")}
            out.update(question=lead + text_question(r), image=None)
            return dict(out, mc=[float(x >= 0.5) for x in r["mc"]]) if labels else out

        def theirs(r):
            text = tok.apply_chat_template([{"role": "user", "content": lead + text_question(r)}], tokenize=False,
                                           add_generation_prompt=True)
            return dict(prompt=text, completions=list(r["steps"]), labels=[bool(x >= 0.5) for x in r["mc"]])
        write_jsonl(os.path.join(d, "project_train.jsonl"), [ours(r) for r in train])
        write_jsonl(os.path.join(d, "project_meta.jsonl"), [ours(r, labels=False) for r in meta])
        write_jsonl(os.path.join(d, "project_test.jsonl"), [ours(r) for r in test])
        write_jsonl(os.path.join(d, "trl_train.jsonl"), [theirs(r) for r in train])
        write_jsonl(os.path.join(d, "trl_test.jsonl"), [theirs(r) for r in test])
        ids = prm.encode_prompt(tok, lead + text_question(train[0]))
        if ids != tok(theirs(train[0])["prompt"], add_special_tokens=False)["input_ids"]:
            raise SystemExit("the prompt's token ids differ between the two formats")
        info[prompt] = len(ids)
    return info


# ----------------------------------------------------------------------------------------------
# One training run (a worker process), taking turns with the others
# ----------------------------------------------------------------------------------------------

class Turns:
    """A worker's side of the turn-taking: 'r' when set up, then each turn (one outer iteration)
    runs between the coordinator's 'g' and the worker's 'd'; the others wait meanwhile."""

    def __init__(self, fds):
        r, w = (int(x) for x in fds.split(","))
        self.r, self.w, self.t0, self.turns = os.fdopen(r, "rb", 0), os.fdopen(w, "wb", 0), None, []

    def _swap(self, msg):
        self.w.write(msg)
        if self.r.read(1) != b"g":
            raise SystemExit("the coordinator went away")

    def start(self):
        self._swap(b"r")
        self.t0 = time.perf_counter()

    def end(self, cots, tokens):
        self.turns.append(dict(seconds=time.perf_counter() - self.t0, cots=cots, tokens=tokens))
        self._swap(b"d")
        self.t0 = time.perf_counter()


def token_classifier(backbone):
    """TRL's model: the backbone, a Linear(hidden, 2) on every token, cross-entropy on the labelled
    tokens (-100 elsewhere)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from transformers import AutoModel

    class Qwen2VLForTokenClassification(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = AutoModel.from_pretrained(backbone, dtype=torch.float32)
            self.config = self.backbone.config
            self.score = nn.Linear(self.config.get_text_config().hidden_size, 2)

        def forward(self, input_ids, attention_mask=None, labels=None):
            h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            logits = self.score(h)                                                    # (B, L, 2)
            loss = None if labels is None else F.cross_entropy(logits.float().view(-1, 2), labels.view(-1),
                                                                ignore_index=-100)
            return {"loss": loss, "logits": logits}
    return Qwen2VLForTokenClassification()


def train_trl(w, turns):
    import datasets
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, DataCollatorForTokenClassification, TrainerCallback
    from trl.experimental.prm import PRMConfig, PRMTrainer
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(w["backbone"])
    model = token_classifier(w["backbone"])
    data = datasets.Dataset.from_list(read_jsonl(os.path.join(w["data"], "trl_train.jsonl")))
    cfg = PRMConfig(output_dir=w["out"], per_device_train_batch_size=w["batch"], max_steps=w["steps"],
                    learning_rate=w["lr"], lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                    bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no", report_to="none",
                    seed=0, disable_tqdm=True, dataloader_pin_memory=False, optim="adamw_torch_fused")
    collate_tokens, base = DataCollatorForTokenClassification(tok), []
    U = w["unroll"]

    def collate(features):
        batch = collate_tokens(features)
        base.append(int(batch["attention_mask"].sum()))                     # batch i is step i + 1's
        return batch

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            turns.start()

        def on_step_end(self, args, state, control, **k):
            if state.global_step % U == 0:                                     # U steps: one outer iteration
                turns.end(U * w["batch"], sum(base[state.global_step - U:state.global_step]))

    PRMTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, data_collator=collate,
               callbacks=[Clock()]).train()
    os.makedirs(w["out"], exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(w["out"], "model.safetensors"))


def train_project(w, turns):
    import bilevel_train as bt
    argv = ["--train", os.path.join(w["data"], "project_train.jsonl"), "--model", w["backbone"],
            "--weighting", w["weighting"], "--iterations", str(w["steps"] // w["unroll"]),
            "--unroll-steps", str(w["unroll"]), "--train-batch", str(w["batch"]), "--lr", str(w["lr"]),
            "--final-answer", "drop", "--device", "cpu", "--out", w["out"], "--overwrite", "--seed", "0"]
    argv += ["--meta", os.path.join(w["data"], "project_meta.jsonl"), "--meta-batch", str(w["meta_batch"])] \
        if w["weighting"] != "fixed" else []
    argv += ["--group-by-question"] if w["mode"] == "shared" else []
    setup, end = bt.setup_run, bt.end_of_iteration

    def setup_run(*a, **k):
        run = setup(*a, **k)
        turns.start()
        return run

    def end_of_iteration(run, done, batches, *a):
        # the iteration's lower steps (and upper step) are done; its logging falls in the next turn
        turns.end(sum(len(b.records) for b in batches),
                  sum(len(run.model.encode(r, cache=True).input_ids) for b in batches for r in b.records))
        return end(run, done, batches, *a)
    bt.setup_run, bt.end_of_iteration = setup_run, end_of_iteration
    bt.main(argv)


def worker(spec):
    """One training run; prints its turns and peak RSS as one JSON line at the end."""
    quiet()
    w = json.loads(spec)
    import torch
    torch.set_num_threads(w["threads"])
    turns = Turns(w["fds"])
    (train_trl if w["system"] == "trl" else train_project)(w, turns)
    print("RESULT " + json.dumps(dict(turns=turns.turns, peak_rss_mb=peak_rss_mb())), flush=True)


def ring(a, prompt, logs):
    """The five runs alive at once, taking turns of one outer iteration; returns each run's
    (seconds, CoTs, tokens) summed over the timed turns, and its peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    procs = []
    for system, mode, weighting in CONFIGS:
        name = f"{prompt}-{system}-{mode}-{weighting}"
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        spec = dict(system=system, mode=mode, weighting=weighting, threads=a.threads, fds=f"{to_r},{from_w}",
                    backbone=os.path.join(a.work, "backbone"), data=os.path.join(a.work, "data", prompt),
                    out=os.path.join(a.work, "runs", name), steps=a.warmup + a.steps, unroll=a.unroll,
                    batch=a.batch, meta_batch=a.meta_batch, lr=a.lr)
        log = open(os.path.join(logs, name + ".log"), "w")
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                             pass_fds=(to_r, from_w), stdout=log, stderr=subprocess.STDOUT, env=env)
        os.close(to_r)
        os.close(from_w)
        procs.append(dict(name=name, p=p, go=os.fdopen(to_w, "wb", 0), back=os.fdopen(from_r, "rb", 0), log=log.name))
    try:
        for w in procs:                                                 # every set-up done before any turn
            if w["back"].read(1) != b"r":
                raise SystemExit(f"{w['name']} failed before its first turn: see {w['log']}")
        cycles = (a.warmup + a.steps) // a.unroll
        for c in range(cycles):
            for w in procs if c % 2 == 0 else procs[::-1]:
                w["go"].write(b"g")
                if w["back"].read(1) != b"d":
                    raise SystemExit(f"{w['name']} failed in cycle {c + 1}: see {w['log']}")
            print(f"  {prompt} prompt: training cycle {c + 1}/{cycles}", file=sys.stderr, flush=True)
        for w in procs:
            w["go"].write(b"g")                                         # finish (and save) together, untimed
        for w in procs:
            w["p"].wait()
    finally:
        for w in procs:
            if w["p"].poll() is None:
                w["p"].kill()
    out = []
    for w in procs:
        lines = [x for x in open(w["log"]).read().splitlines() if x.startswith("RESULT ")]
        if not lines:
            raise SystemExit(f"{w['name']} wrote no result: see {w['log']}")
        res = json.loads(lines[-1][7:])
        timed = res["turns"][a.warmup // a.unroll:]
        warnings = [x for x in open(w["log"]).read().splitlines() if x.startswith("warning: the PRM's step values")]
        out.append({k: sum(t[k] for t in timed) for k in ("seconds", "cots", "tokens")} |
                   dict(peak_rss_mb=res["peak_rss_mb"], out=os.path.join(a.work, "runs", w["name"]), warnings=warnings))
    return out


# ----------------------------------------------------------------------------------------------
# Scoring N = 8 CoTs of a question, and the step quality of the trained PRMs
# ----------------------------------------------------------------------------------------------

def trl_encode(tok, row):
    """TRL's tokenize_row for a stepwise record: token ids and the separator position after each step."""
    from trl.experimental.prm import PRMTrainer
    enc = PRMTrainer.tokenize_row(row, tok, "\n", None, None, False, True)
    return enc["input_ids"], [i for i, x in enumerate(enc["labels"]) if x != -100]


def trl_values(model, encs):
    """TRL's way of scoring: one forward per CoT, P(correct) at each step's separator."""
    import torch
    return [model(torch.tensor([ids]))["logits"][0, seps].softmax(-1)[:, 1] for ids, seps in encs]


def project_values(model, encs, budget):
    """rerank.py's packed scoring: forwards of at most `budget` tokens (None: one forward)."""
    import prm
    return [prm.step_values(model, [encs[i] for i in group]) for group in prm.token_batches(encs, budget)]


def score(a, prompt):
    """Seconds per question of each way of scoring, summed over rounds taken in turns."""
    import prm
    import torch
    from transformers import AutoTokenizer
    d, backbone = os.path.join(a.work, "data", prompt), os.path.join(a.work, "backbone")
    tok = AutoTokenizer.from_pretrained(backbone)
    ours, theirs = prm.PRM.from_backbone(backbone).eval(), token_classifier(backbone).eval()
    by_question = {}
    for r, t in zip(read_jsonl(os.path.join(d, "project_test.jsonl")), read_jsonl(os.path.join(d, "trl_test.jsonl"))):
        by_question.setdefault(r["id"], []).append((r, t))
    questions = [q for q in by_question.values() if len(q) == a.n][:a.questions]
    enc_ours = [[prm.encode_cot(tok, r["question"], r["steps"]) for r, _ in q] for q in questions]
    enc_trl = [[trl_encode(tok, t) for _, t in q] for q in questions]
    budget = prm.scoring_budget("cpu")
    ways = {"TRL, one forward per CoT": lambda: [trl_values(theirs, q) for q in enc_trl],
            "packed, one forward": lambda: [prm.step_values(ours, q) for q in enc_ours],
            f"packed, rerank.py's CPU batches ({budget} tokens)": lambda: [project_values(ours, q, budget)
                                                                           for q in enc_ours],
            "shared-prefix": lambda: [prm.shared_prefix_values(ours, q) for q in enc_ours]}
    seconds = dict.fromkeys(ways, 0.0)
    with torch.no_grad():
        for fn in ways.values():
            fn()                                                                    # warm-up
        v, m = prm.step_values(ours, enc_ours[0])
        if (v - prm.shared_prefix_values(ours, enc_ours[0])[0])[m].abs().max() > 1e-5:
            raise SystemExit("packed and shared-prefix scoring disagree")
        for r in range(a.rounds):
            for name in list(ways) if r % 2 == 0 else list(ways)[::-1]:
                t = time.perf_counter()
                ways[name]()
                seconds[name] += time.perf_counter() - t
    return {name: s / (a.rounds * len(questions)) for name, s in seconds.items()}


def step_figures(values, labels):
    """Step accuracy at 0.5, AUC, MSE against binary labels, and the mean value."""
    import bilevel_train as bt
    return dict(accuracy=sum((v >= 0.5) == y for v, y in zip(values, labels)) / len(values),
                auc=bt.auc(values, labels), mse=sum((v - y) ** 2 for v, y in zip(values, labels)) / len(values),
                mean=sum(values) / len(values))


def quality(a, runs):
    """The step figures of the short-prompt runs' PRMs on the toy test labels."""
    import prm
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    d, backbone = os.path.join(a.work, "data", "short"), os.path.join(a.work, "backbone")
    tok = AutoTokenizer.from_pretrained(backbone)
    rows, trows = read_jsonl(os.path.join(d, "project_test.jsonl")), read_jsonl(os.path.join(d, "trl_test.jsonl"))
    labels = [float(x) for r in rows for x in r["mc"]]
    figures = {}
    with torch.no_grad():
        theirs = token_classifier(backbone).eval()
        theirs.load_state_dict(load_file(os.path.join(runs[0]["out"], "model.safetensors")))
        figures[CONFIGS[0]] = step_figures([v for t in trows for v in trl_values(theirs, [trl_encode(tok, t)])[0].tolist()],
                                           labels)
        for config, run in zip(CONFIGS[1:], runs[1:]):
            model = prm.PRM.from_pretrained(run["out"]).eval()
            values = []
            for i in range(0, len(rows), 8):
                v, m = prm.step_values(model, [prm.encode_cot(tok, r["question"], r["steps"]) for r in rows[i:i + 8]])
                values += v[m].tolist()
            figures[config] = step_figures(values, labels)
    return figures, sum(labels) / len(labels)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

NAMES = {CONFIGS[1]: "vanilla, packed", CONFIGS[2]: "vanilla, shared-prefix", CONFIGS[3]: "DreamPRM bi-level, packed",
         CONFIGS[4]: "DreamPRM bi-level, shared-prefix"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/bench-trl", help="working folder: backbone, data, runs, logs")
    ap.add_argument("--threads", type=int, default=1, help="threads of each system")
    ap.add_argument("--long-prompt", type=int, default=400, help="tokens of the long prompt, chat template included")
    ap.add_argument("--steps", type=int, default=15, help="timed optimizer steps of each training run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    ap.add_argument("--unroll", type=int, default=5, help="U: lower steps per outer iteration, one turn")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--meta-batch", type=int, default=16, help="DreamPRM: meta CoTs per upper step")
    ap.add_argument("--lr", type=float, default=1e-4, help="the lower lr of both systems")
    ap.add_argument("--n", type=int, default=8, help="CoTs per question in scoring")
    ap.add_argument("--questions", type=int, default=10, help="test questions scored per round")
    ap.add_argument("--rounds", type=int, default=4, help="scoring rounds, the ways taken in turns")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    if a.warmup % a.unroll or a.steps % a.unroll or a.steps <= 0:
        ap.error("--warmup and --steps must be multiples of --unroll, and --steps > 0")
    quiet()
    require_trl()
    import torch
    torch.set_num_threads(a.threads)
    logs = os.path.join(a.work, "logs")
    os.makedirs(logs, exist_ok=True)
    prompt_tokens = prepare(a.work, a.long_prompt)
    print(f"TRL {TRL_VERSION} against this project, {a.threads} thread(s) each, batch {a.batch}, lr {a.lr:g}, "
          f"{a.steps} timed steps after {a.warmup}; ratios project / TRL\n")
    print("| training | prompt | CoTs/s ratio | tokens/s ratio | peak RSS ratio | project CoTs/s | TRL CoTs/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    trained = {}
    for prompt in ("short", "long"):
        runs = trained[prompt] = ring(a, prompt, logs)
        trl = runs[0]
        for config, run in zip(CONFIGS[1:], runs[1:]):
            print(f"| {NAMES[config]} | {prompt_tokens[prompt]} tokens | "
                  f"{(run['cots'] / run['seconds']) / (trl['cots'] / trl['seconds']):.2f}x | "
                  f"{(run['tokens'] / run['seconds']) / (trl['tokens'] / trl['seconds']):.2f}x | "
                  f"{run['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x | {run['cots'] / run['seconds']:.2f} | "
                  f"{trl['cots'] / trl['seconds']:.2f} |", flush=True)
    # An outer iteration is U lower steps (forward and backward, about 3 forwards F of a batch each),
    # then a meta forward and backward (3F x M / B) and two forwards of a train batch (2F): DreamPRM's
    # floor is 3U / (3U + 3M/B + 2) of the vanilla path's CoTs/s.
    floor = 3 * a.unroll / (3 * a.unroll + 3 * a.meta_batch / a.batch + 2)
    print(f"\nDreamPRM against its arithmetic floor, {floor:.3f} x the same path's vanilla CoTs/s (U = {a.unroll}, "
          f"M = {a.meta_batch}, B = {a.batch}):\n")
    print("| path | prompt | DreamPRM CoTs/s | floor CoTs/s | DreamPRM / floor |")
    print("|---|---|---:|---:|---:|")
    for prompt in ("short", "long"):
        runs = trained[prompt]
        for vanilla, dreamprm, path in ((runs[1], runs[3], "packed"), (runs[2], runs[4], "shared-prefix")):
            rate, bound = dreamprm["cots"] / dreamprm["seconds"], floor * vanilla["cots"] / vanilla["seconds"]
            print(f"| {path} | {prompt_tokens[prompt]} tokens | {rate:.2f} | {bound:.2f} | {rate / bound:.2f} |")
    print(f"\nScoring the N = {a.n} CoTs of a question against TRL's one forward per CoT:\n")
    print("| project path | prompt | speed-up over TRL | project ms/question | TRL ms/question |")
    print("|---|---|---:|---:|---:|")
    for prompt in ("short", "long"):
        seconds = score(a, prompt)
        base = seconds.pop("TRL, one forward per CoT")
        for name, s in seconds.items():
            print(f"| {name} | {prompt_tokens[prompt]} tokens | {base / s:.2f}x | {1e3 * s:.0f} | {1e3 * base:.0f} |",
                  flush=True)
    figures, positive = quality(a, trained["short"])
    print(f"\nstep quality after {a.warmup + a.steps} steps at lr {a.lr:g} (short prompt), on the toy test labels "
          f"(positive rate {positive:.3f}):\n")
    print("| PRM | step accuracy | step AUC | MSE | mean value |")
    print("|---|---:|---:|---:|---:|")
    for config, f in figures.items():
        auc = "n/a" if f["auc"] is None else f"{f['auc']:.3f}"
        print(f"| {NAMES.get(config, 'TRL PRMTrainer')} | {f['accuracy']:.3f} | {auc} | {f['mse']:.4f} | {f['mean']:.3f} |")
    for config, run in zip(CONFIGS[1:], trained["short"][1:]):
        for line in run["warnings"][:1]:
            print(f"{NAMES[config]}: bilevel_train.py said: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
