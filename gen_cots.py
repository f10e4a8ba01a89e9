"""Sample N structured chains of thought (CoTs) per question from a policy model.

Reads   questions.jsonl  {"id", "domain", "question", "image", "answer", "choices"?}
Writes  cots.jsonl       the question fields + {"sample", "seed", "steps", "final", "pred", "correct", "policy"}
        appended and flushed record by record; a rerun skips finished questions (crash-safe).

Policies (the interface mc_label.py uses too): `policy.sample(prompts, n)` returns n continuations
for each prompt (question, image, assistant prefix):
  toy     the scripted solver of the toy world (see TOY_DOMAINS); continues from any prefix
  hf      a transformers image-text model from a local directory (batched sampling)
  openai  any OpenAI-compatible chat-completions server (vLLM, SGLang, a hosted API)

Build the toy world and sample its CoTs:
    python gen_cots.py --toy
Real data:
    python gen_cots.py --questions q.jsonl --out cots.jsonl --policy openai \\
        --base-url http://localhost:8000/v1 --model-name Qwen2-VL-7B-Instruct --n 8
"""

import base64
import http.client
import json
import mimetypes
import os
import random
import re
import sys
import time
import urllib.parse
import zlib
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import prm

# The paper's structured-thinking prompt: five steps, then the answer line.
STRUCTURED_PROMPT = (
    "You are given a question about an image. Solve it step by step, in exactly this structure:\n"
    "Step 1: Restate the question.\n"
    "Step 2: Gather evidence from the image.\n"
    "Step 3: Identify any background knowledge needed.\n"
    "Step 4: Reason with the current evidence.\n"
    "Step 5: Summarize and conclude with all the information.\n"
    "Then write the last line as 'Final answer: <answer>'.\n\n"
)
FREE_PROMPT = "Answer the question about the image. Think it through, then write 'Final answer: <answer>'.\n\n"


def cot_record(question, text, sample, seed, policy_name):
    """A cots.jsonl record from a question record and a sampled CoT text."""
    split = prm.split_steps(text)
    pred = split.final.splitlines()[0].strip() if split.final else prm.extract_answer(text)
    rec = {k: v for k, v in question.items()}
    rec.update(sample=sample, seed=seed, steps=split.steps, final=split.final, pred=pred,
               correct=prm.match_answer(pred, question["answer"], question.get("choices")), policy=policy_name)
    return rec


# --------------------------------------------------------------------------------------------
# The toy world: Pillow images, domains of known quality, a scripted policy
# --------------------------------------------------------------------------------------------

# Every toy parameter in one place (the README quotes this table).
#   key_noise: chance that a question's answer key is the misread answer, as an annotator who
#              misreads the image the way the policy does would write it (its labels then reward
#              the misreading and punish the right reading)
#   misread / miscalc: the toy policy's chance to misread a number in the image / to add wrongly
#   in_text: the numbers are written in the question too (trivially easy: the image is not needed)
#   blank_image: the image shows unrelated shapes, not the numbers (image-irrelevant)
#   quality: the true quality rank of the domain's labels (3 best), for the README's comparison
TOY_DOMAINS = {
    "clean":      dict(key_noise=0.0, misread=0.3, miscalc=0.3, in_text=False, blank_image=False, quality=3),
    "irrelevant": dict(key_noise=0.1, misread=0.3, miscalc=0.3, in_text=True, blank_image=True, quality=2),
    "easy":       dict(key_noise=0.0, misread=0.0, miscalc=0.0, in_text=True, blank_image=False, quality=1),
    "noisy":      dict(key_noise=0.9, misread=0.3, miscalc=0.3, in_text=False, blank_image=False, quality=0),
}
# Questions per set; the noisy domain is the largest, as scraped data often is.
TOY_SETS = dict(train=dict(clean=40, irrelevant=40, easy=40, noisy=80), meta=40, test=40)
TOY_N = 8            # CoTs per question
TOY_DIR = prm.TOY_DIR

# Error steps carry the policy's hedge, the surface cue a tiny PRM can learn.
_READ_RE = re.compile(r"shows (-?\d+) and (-?\d+)")
_SUM_RE = re.compile(r"= (-?\d+)")


def draw_numbers(path, a, b, blank, seed):
    rng = random.Random(seed)
    img = Image.new("RGB", (112, 56), "white")
    d = ImageDraw.Draw(img)
    if blank:
        for _ in range(4):
            x, y = rng.randrange(90), rng.randrange(40)
            d.ellipse([x, y, x + 18, y + 14], fill=(rng.randrange(256), rng.randrange(256), 120))
    else:
        d.rectangle([4, 4, 52, 52], outline="navy", width=2)
        d.rectangle([60, 4, 108, 52], outline="darkred", width=2)
        d.text((22, 22), str(a), fill="black")
        d.text((78, 22), str(b), fill="black")
    img.save(path)


def toy_question(qid, domain, rng, image_dir, used):
    """One toy question; `used` holds the number pairs drawn so far, so that no question (text and
    image) appears twice in the toy world: a meta or test question is never a training question."""
    cfg = TOY_DOMAINS.get(domain, TOY_DOMAINS["clean"])
    a, b = rng.randrange(10, 50), rng.randrange(10, 50)
    while (a, b) in used:
        a, b = rng.randrange(10, 50), rng.randrange(10, 50)
    used.add((a, b))
    misread = rng.choice([-3, -2, 2, 3])        # how this image's first number gets misread
    answer = a + b
    corrupted = rng.random() < cfg["key_noise"]
    if corrupted:
        answer += misread
    image = f"images/{qid}.png"
    draw_numbers(os.path.join(image_dir, f"{qid}.png"), a, b, cfg["blank_image"], rng.random())
    q = f"The two boxes hold {a} and {b}. What is their sum?" if cfg["in_text"] else \
        "What is the sum of the two numbers in the image?"
    return {"id": qid, "domain": domain, "question": q, "image": image, "answer": str(answer),
            "toy": {"a": a, "b": b, "misread": misread, "domain": domain, "key_corrupted": corrupted}}


def build_toy_world(root, seed):
    """Write the toy question sets: root/{train,meta,test}_questions.jsonl and root/images/."""
    rng, used, images = random.Random(seed), set(), os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    sets = {"train": [toy_question(f"train-{d}-{i}", d, rng, images, used)
                      for d in TOY_DOMAINS for i in range(TOY_SETS["train"][d])],
            "meta": [toy_question(f"meta-{i}", "clean", rng, images, used) for i in range(TOY_SETS["meta"])],
            "test": [toy_question(f"test-{i}", "clean", rng, images, used) for i in range(TOY_SETS["test"])]}
    for name, records in sets.items():
        for r in records:
            if name != "train":
                r["domain"] = name
        tmp = os.path.join(root, f"{name}_questions.jsonl.tmp")
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, os.path.join(root, f"{name}_questions.jsonl"))
    return {name: os.path.join(root, f"{name}_questions.jsonl") for name in sets}


class ToyPolicy:
    """The scripted solver: writes the five structured steps, misreading or miscalculating with
    its domain's rates, and continues from any prefix by reading back what the prefix states."""
    name = "toy"

    def __init__(self, seed):
        self.seed = seed

    def continue_cot(self, question, prefix, k=0):
        """Continue `prefix`; the k-th sample from a given (question, prefix) is always the same."""
        toy = question.get("toy")
        if toy is None:
            raise prm.DataError("the toy policy needs toy questions (gen_cots.py --toy)", field="toy")
        cfg = TOY_DOMAINS.get(toy["domain"], TOY_DOMAINS["clean"])
        rng = random.Random(zlib.crc32(f"{self.seed}|{question['id']}|{prefix}|{k}".encode()))
        done = prm.split_steps(prefix).steps if prefix.strip() else []
        out = []
        read = _READ_RE.search(prefix)
        x, y = (int(read.group(1)), int(read.group(2))) if read else (None, None)
        s = None
        m4 = [st for st in done if st.startswith("Step 4")]
        if m4 and _SUM_RE.search(m4[0]):
            s = int(_SUM_RE.search(m4[0]).group(1))
        for step in range(len(done) + 1, 6):
            if step == 1:
                out.append("Step 1: Restate the question. We need the sum of the two numbers.")
            elif step == 2:
                x, y = toy["a"], toy["b"]
                if rng.random() < cfg["misread"]:
                    x += toy["misread"]
                    out.append(f"Step 2: Gather evidence. Hmm, I guess the image shows {x} and {y}.")
                else:
                    out.append(f"Step 2: Gather evidence. The image shows {x} and {y}.")
            elif step == 3:
                out.append("Step 3: Background knowledge. Add the two numbers.")
            elif step == 4:
                s = x + y
                if rng.random() < cfg["miscalc"]:
                    s += rng.choice([-2, -1, 1, 2])
                    out.append(f"Step 4: Reason. Maybe {x} + {y} = {s}.")
                else:
                    out.append(f"Step 4: Reason. {x} + {y} = {s}.")
            else:
                out.append(f"Step 5: Conclude. The sum is {s}.")
        text = "\n".join(out)
        return (("\n" if prefix.strip() and text else "") + text + f"\nFinal answer: {s}").lstrip("\n")

    parallel, batch_size = False, 4096         # in-process and instant: large batches, no threads

    def sample(self, prompts, n):
        return [[self.continue_cot(p["question"], p["prefix"], p.get("first", 0) + k) for k in range(n)]
                for p in prompts]


# --------------------------------------------------------------------------------------------
# hf and openai policies
# --------------------------------------------------------------------------------------------

def user_text(question, structured):
    return (STRUCTURED_PROMPT if structured else FREE_PROMPT) + prm.question_text(question)


class HFPolicy:
    """A transformers model from a local directory, image-text (a family of prm.FAMILIES) or a
    text-only causal LM; several prompts per generate call."""

    def __init__(self, path, temperature, max_new_tokens, structured, trust_remote_code, batch_size, top_p, top_k,
                 device="auto"):
        from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
        prm._quiet_transformers()
        prm_dir = prm.prm_directory(path)
        if prm._is_prm_dir(prm_dir):
            raise prm.DataError("a trained PRM (prm.json, prm.safetensors), not a policy: a PRM scores CoTs and "
                                "cannot write them; give the model that samples them (an instruct checkpoint)",
                                file=prm_dir, field="--model")
        vision = prm.check_backbone(path)
        prm.check_safetensors(path)
        self.device = prm.pick_device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        self.model = prm.load_weights(auto, path, "the policy model", dtype=dtype,
                                      trust_remote_code=trust_remote_code).to(self.device).eval()
        with prm._load_errors(path, "the policy model"):
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                           padding_side="left")
            self.image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code) \
                if vision else None
        prm.use_chat_template(self.tokenizer, path, vision)
        # How this family takes images (prm.Family), chosen once, as the PRM does.
        self.family = prm.bind_family(self.model.config, self.image_processor) if vision else None
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.family.image_token) if vision else None
        self.temperature, self.max_new_tokens, self.structured = temperature, max_new_tokens, structured
        self.top_p, self.top_k = top_p, top_k
        self.parallel, self.batch_size = False, batch_size    # one generate call per batch of prompts
        self.name = f"hf:{os.path.basename(os.path.normpath(path))}"

    def sample(self, prompts, n):
        out = []
        for i in range(0, len(prompts), self.batch_size):
            out += self._generate(prompts[i:i + self.batch_size], n)
        return out

    def _generate(self, prompts, n):
        seqs, images, masks = [], [], []
        for p in prompts:
            image = None
            if p["question"].get("_image"):
                if self.image_processor is None:
                    raise prm.DataError("this policy is a text-only model, but the question has an image",
                                        *p["question"].get("_src", (None, None)), "image")
                image = prm.image_inputs(self.image_processor, Image.open(p["question"]["_image"]), family=self.family)
                images.append(image)
            ids = prm.encode_prompt(self.tokenizer, user_text(p["question"], self.structured), image, self.family)
            if p["prefix"]:
                ids += self.tokenizer(p["prefix"], add_special_tokens=False)["input_ids"]
            seqs.append(torch.tensor(ids))
            masks.append((seqs[-1] == self.image_token_id).long() if self.family else None)
        L = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, L - len(s):], mask[b, L - len(s):] = s, 1          # left-padded: generation continues each row
        kwargs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        if images:
            image_mask = torch.zeros_like(ids)
            for b, (m, s) in enumerate(zip(masks, seqs)):
                image_mask[b, L - len(s):] = m
            tensors = {k: v.to(self.device) for k, v in prm.image_batch(images, self.family).items()}
            kwargs.update(prm.image_kwargs(self.family, tensors, image_mask.to(self.device), self.model.dtype))
        # Every sampling setting is passed, so the model's generation_config.json (Qwen2-VL-2B-Instruct's
        # says top_k 1, top_p 0.001: greedy) never overrides the flags. Temperature 0 is greedy decoding:
        # one sequence per prompt, n copies of it.
        greedy = self.temperature == 0
        sampling = dict(do_sample=False, num_return_sequences=1) if greedy else dict(
            do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, num_return_sequences=n)
        with torch.no_grad():
            gen = self.model.generate(**kwargs, max_new_tokens=self.max_new_tokens, **sampling)
        texts = self.tokenizer.batch_decode(gen[:, L:], skip_special_tokens=True)
        k = 1 if greedy else n
        return [texts[b * k:(b + 1) * k] * (n // k) for b in range(len(prompts))]


class OpenAIPolicy:
    """Any OpenAI-compatible chat-completions server. The API key is read from an environment
    variable and never printed. The assistant prefix is sent as a final assistant message that
    the server continues (vLLM: continue_final_message)."""

    def __init__(self, base_url, model_name, api_key_env, temperature, max_tokens, structured, concurrency, retries,
                 timeout, top_p, top_k, backoff=1.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_name, self.key = model_name, os.environ.get(api_key_env, "")
        self.temperature, self.max_tokens, self.structured = temperature, max_tokens, structured
        self.concurrency, self.retries, self.timeout, self.backoff = concurrency, retries, timeout, backoff
        self.top_p, self.top_k = top_p, top_k
        self.parallel, self.batch_size = True, 1    # one HTTP request per prompt, `concurrency` in flight
        self.name = f"openai:{model_name}"

    def payload(self, p, n):
        content = [{"type": "text", "text": user_text(p["question"], self.structured)}]
        image = p["question"].get("_image")
        if image:
            mime = mimetypes.guess_type(image)[0] or "image/png"
            with open(image, "rb") as f:
                data = base64.b64encode(f.read()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})
        messages = [{"role": "user", "content": content}]
        body = dict(model=self.model_name, messages=messages, n=n, temperature=self.temperature,
                    max_tokens=self.max_tokens)
        if self.top_p != 1.0:
            body["top_p"] = self.top_p
        if self.top_k:
            body["top_k"] = self.top_k                          # vLLM and SGLang take it
        if p["prefix"]:
            messages.append({"role": "assistant", "content": p["prefix"]})
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    def request(self, body):
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = None
        for attempt in range(self.retries + 1):
            try:
                status, reply = post(self.url, data, headers, self.timeout)
                if status == 200:
                    return choice_texts(json.loads(reply), body["n"])
                last = f"HTTP {status}"
                if status != 429 and status < 500:
                    break
            # Socket errors and timeouts are OSErrors; a reply cut off mid-body is an HTTPException.
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                last = type(e).__name__ + (f": {e}" if str(e) else "")
            if attempt < self.retries:
                wait = self.backoff * 2 ** attempt
                tqdm.write(f"{self.url}: {last}; attempt {attempt + 1} of {self.retries + 1} failed, next in {wait:.0f} s",
                           file=sys.stderr)
                time.sleep(wait)
        hint = " (the base URL of an OpenAI-compatible server usually ends in /v1)" \
            if last == "HTTP 404" and "/v1" not in self.url else ""
        raise PolicyError(f"{self.url}: request failed after {self.retries + 1} tries ({last}){hint}; "
                          "what was written is kept and a rerun resumes")

    def sample(self, prompts, n):
        if len(prompts) == 1:
            return [self.request(self.payload(prompts[0], n))]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda p: self.request(self.payload(p, n)), prompts))


def post(url, data, headers, timeout):
    """POST `data` to url; returns (HTTP status, reply body). `timeout` (seconds) bounds the whole
    exchange, connecting, sending and reading together: each socket operation gets what is left of
    it, so a server that trickles its reply cannot hold a request past the deadline."""
    deadline = time.monotonic() + timeout
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"not an http(s) URL: {url}")
    conn = (http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection)(
        u.hostname, u.port, timeout=timeout)

    def left():
        t = deadline - time.monotonic()
        if t <= 0:
            raise TimeoutError
        return t
    try:
        conn.request("POST", (u.path or "/") + (f"?{u.query}" if u.query else ""), body=data, headers=headers)
        sock = conn.sock                                    # kept: the reply reads from it after getresponse
        sock.settimeout(left())
        resp = conn.getresponse()
        chunks = []
        while True:
            sock.settimeout(left())
            chunk = resp.read1(1 << 16)                     # returns what one socket read brought
            if not chunk:
                if resp.length:                             # the connection closed before the promised length
                    raise http.client.IncompleteRead(b"".join(chunks), resp.length)
                return resp.status, b"".join(chunks)
            chunks.append(chunk)
    except TimeoutError:                                    # a socket read that ran out of time, or left()
        raise TimeoutError(f"no complete reply within --timeout {timeout:g} s") from None
    finally:
        conn.close()


def choice_texts(out, n):
    """The n texts of a chat-completions response, in index order. A body that is not such a
    response, a choice without text, or fewer choices than asked is a ValueError, retried like a
    network error: a record is never written from fewer samples than asked."""
    choices = out.get("choices") if isinstance(out, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise ValueError("the response holds no list of choices")
    choices = sorted(choices, key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)
    texts = [c["message"].get("content") if isinstance(c.get("message"), dict) else None for c in choices]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("a choice without text content")
    if len(texts) < n:
        raise ValueError(f"{len(texts)} choices where {n} were asked")
    return texts[:n]


class PolicyError(prm.DataError):
    """The policy could not answer (an unreachable server after its retries): one line, exit 2."""


# --------------------------------------------------------------------------------------------
# Keeping the policy busy: many questions (or CoTs) in flight at once
# --------------------------------------------------------------------------------------------

def drive(policy, tasks, on_done, concurrency):
    """Run tasks against the policy with up to `concurrency` requests in flight, across tasks.

    A task is a generator: it yields a list of requests [(prompt, n)], is sent back their results
    [[n texts] per request], and finally returns its output, handed to on_done(output) in the
    calling thread as soon as the task completes (so records are written as they complete).
    New tasks start only while there is room (back-pressure: a huge input is never all queued).
    The openai policy gets one HTTP request per prompt from a pool of `concurrency` threads; the
    toy and hf policies get batches of up to batch_size prompts that share n (hf: one generate).
    Returns the peak number of requests in flight.
    """
    s = _Schedule(tasks, on_done, concurrency if policy.parallel else policy.batch_size)
    s.fill(0)
    s.flush()
    return _drive_threads(policy, s, concurrency) if policy.parallel else _drive_batches(policy, s)


class _Schedule:
    """drive's bookkeeping: requests not yet sent, tasks waiting for their answers, finished outputs."""

    def __init__(self, tasks, on_done, room):
        self.tasks, self.on_done, self.room = iter(tasks), on_done, room
        self.finished = []            # outputs of completed tasks, handed to on_done between sends
        self.waiting = deque()        # (task id, slot, prompt, n) not yet sent
        self.active = {}              # task id -> [generator, results, unanswered]
        self.next_id = 0

    def advance(self, tid, gen, results):
        """Send a task its results; queue the requests it yields next, or keep its output."""
        try:
            requests = gen.send(results)
        except StopIteration as stop:
            self.finished.append(stop.value)
            return
        if not requests:
            return self.advance(tid, gen, [])
        self.active[tid] = [gen, [None] * len(requests), len(requests)]
        self.waiting.extend((tid, slot, prompt, n) for slot, (prompt, n) in enumerate(requests))

    def answer(self, tid, slot, texts):
        entry = self.active[tid]
        entry[1][slot] = texts
        entry[2] -= 1
        if entry[2] == 0:
            del self.active[tid]
            self.advance(tid, entry[0], entry[1])

    def fill(self, in_flight):
        """Start new tasks while the requests waiting and in flight leave room."""
        while len(self.waiting) + in_flight < self.room:
            gen = next(self.tasks, None)
            if gen is None:
                return
            self.next_id += 1
            self.advance(self.next_id, gen, None)

    def flush(self):
        while self.finished:
            self.on_done(self.finished.pop(0))


def _drive_batches(policy, s):
    """Toy and hf policies: batches of waiting prompts that share n, one sample() call each."""
    peak = 0
    while s.waiting:
        n = s.waiting[0][3]
        batch = [w for w in s.waiting if w[3] == n][:policy.batch_size]
        for w in batch:
            s.waiting.remove(w)
        peak = max(peak, len(batch))
        for (tid, slot, _, _), texts in zip(batch, policy.sample([w[2] for w in batch], n)):
            s.answer(tid, slot, texts)
        s.fill(0)
        s.flush()
    return peak


def _drive_threads(policy, s, concurrency):
    """The openai policy: one request per prompt, up to `concurrency` in flight on a thread pool."""
    peak, in_flight = 0, {}
    with ThreadPoolExecutor(concurrency) as pool:
        def send():
            while s.waiting and len(in_flight) < concurrency:
                tid, slot, prompt, n = s.waiting.popleft()
                in_flight[pool.submit(policy.sample, [prompt], n)] = (tid, slot)

        while s.waiting or in_flight:
            send()
            peak = max(peak, len(in_flight))
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for f in done:
                s.answer(*in_flight.pop(f), f.result()[0])
            s.fill(len(in_flight))
            send()                                                # refill the server before writing
            s.flush()
    return peak


def policy_params(args):
    """The flags of the policy that shape every sampled text (shared by gen_cots and mc_label)."""
    model = {"toy": None, "hf": args.model, "openai": args.model_name}[args.policy]
    params = dict(policy=args.policy, model=model, seed=args.seed, temperature=args.temperature,
                  max_tokens=args.max_tokens, structured=not args.no_structure)
    if args.top_p != 1.0:                         # only when set: outputs written before these flags still match
        params["top_p"] = args.top_p
    if args.top_k:
        params["top_k"] = args.top_k
    return params


@dataclass
class Policy:
    """The policy (shared by gen_cots.py and mc_label.py)"""
    policy: str = prm.option("toy", "policy back end", choices=("toy", "hf", "openai"))
    model: str = prm.option(None, "hf: local model directory ('tiny' for the tiny backbone)")
    base_url: str = prm.option("http://localhost:8000/v1", "openai: server base URL")
    model_name: str = prm.option("default", "openai: model name on the server")
    api_key_env: str = prm.option("OPENAI_API_KEY", "openai: environment variable holding the key")
    concurrency: int = prm.option(64, "requests in flight at once, across questions and CoTs (openai; >= 1; 64 keeps "
                                  "one vLLM server busy)", type=prm.number(int, 1, 4096))
    batch_size: int = prm.option(8, "hf: prompts per generate call, across questions and CoTs (>= 1)",
                                 type=prm.number(int, 1, 1 << 16))
    retries: int = prm.option(5, "openai: retries on 429, 5xx and network errors (>= 0)", type=prm.number(int, 0, 100))
    temperature: float = prm.option(0.7, "sampling temperature (0: greedy decoding, every sample the same text)",
                                    type=prm.number(float, 0, 100))
    top_p: float = prm.option(1.0, "nucleus sampling: the smallest set of tokens with this much probability (1: off); "
                              "passed to the policy explicitly", type=prm.number(float, 0, 1, above=True))
    top_k: int = prm.option(0, "sample among the k likeliest tokens (0: off); passed explicitly, so a model's "
                            "generation config never overrides it", type=prm.number(int, 0, 1 << 20))
    timeout: float = prm.option(60.0, "openai: seconds a request may take before it counts as failed and is retried",
                                type=prm.number(float, 0, 86400, above=True))
    max_tokens: int = prm.option(512, "new tokens per sample (the tiny backbone's random text only tests the plumbing)",
                                 type=prm.number(int, 1, 1 << 20), presets={"--model tiny": 64})
    no_structure: bool = prm.option(False, "free-form prompt (ablation)")
    seed: int = prm.option(0, "sampling seed (>= 0)", type=prm.number(int, 0, 2 ** 31 - 1))
    trust_remote_code: bool = prm.option(False, "hf: allow model code from the directory")


def fill_policy_presets(args):
    """--max-tokens is small for the tiny backbone (hf policy), unless set."""
    prm.fill_presets(args, [Policy], ["--model tiny"] if args.policy == "hf" and args.model == "tiny" else [])
    return args


def make_policy(args):
    """The policy the Policy flags ask for (their presets filled first), with .params: the settings
    that shape every sampled text, which gen_cots.py and mc_label.py record beside their output."""
    fill_policy_presets(args)
    if args.policy == "toy":
        policy = ToyPolicy(args.seed)
    elif args.policy == "hf":
        if not args.model:
            raise prm.DataError("--policy hf needs --model DIR", field="--model")
        torch.manual_seed(args.seed)
        policy = HFPolicy(prm.resolve_model(args.model), args.temperature, args.max_tokens, not args.no_structure,
                          args.trust_remote_code, args.batch_size, args.top_p, args.top_k)
    else:
        policy = OpenAIPolicy(args.base_url, args.model_name, args.api_key_env, args.temperature, args.max_tokens,
                              not args.no_structure, args.concurrency, args.retries, args.timeout, args.top_p,
                              args.top_k)
    policy.params = policy_params(args)
    return policy


# --------------------------------------------------------------------------------------------
# Crash-safe output
# --------------------------------------------------------------------------------------------

def read_questions(path, outside_images):
    """The questions of a questions.jsonl (ours), ids unique; records without steps are skipped (a
    line saying so), and a file with no question left is an error."""
    questions, skips = prm.read_cots(path, "questions", fmt="ours", outside_images=outside_images)
    if skips:
        print(f"{path}: {prm.skip_report(skips, [q['id'] for q in questions])}")
    if not questions:
        raise prm.DataError("no questions in the file", file=path)
    prm.check_unique(questions, lambda q: q["id"], "question id")
    return questions


def sample_task(q, missing, seed, policy_name):
    """One question's missing samples: one request for len(missing) CoTs."""
    texts, = yield [({"question": q, "prefix": "", "first": missing[0]}, len(missing))]
    return [cot_record(q, t, i, seed, policy_name) for i, t in zip(missing, texts)]


def generate(questions, out_path, policy, n, seed, concurrency, params):
    """Sample n CoTs per question into out_path, skipping the (question, sample) pairs already
    there; up to `concurrency` questions in flight, records appended as each question completes.
    One writer per output (a lock), and the parameters that shape the records must match the
    output's stored ones. Returns the number of CoTs sampled (0: all were there already)."""
    with prm.output_lock(out_path):
        prm.check_params(out_path, params or {})
        done = prm.done_records(out_path, lambda o: (o["id"], o["sample"]))
        prm.check_keys({k[0]: o for k, o in done.items()}, questions, lambda q: q["id"], ("answer", "choices"))
        todo = [(q, [i for i in range(n) if (q["id"], i) not in done]) for q in questions]
        todo = [(q, missing) for q, missing in todo if missing]
        with open(out_path, "a", encoding="utf-8") as f, \
                prm.progress(total=len(questions), initial=len(questions) - len(todo), unit="q",
                             desc=f"gen {os.path.basename(out_path)}") as bar:
            def write(records):
                prm.append_jsonl(f, *records)
                bar.update(1)
            drive(policy, (sample_task(q, missing, seed, policy.name) for q, missing in todo), write, concurrency)
    return sum(len(missing) for _, missing in todo)


@dataclass
class Sampling:
    """Questions and samples"""
    questions: str = prm.option(None, "questions.jsonl")
    out: str = prm.option(None, "cots.jsonl to append to (default: beside the questions)")
    n: int = prm.option(TOY_N, "CoTs per question (>= 1)", type=prm.number(int, 1, 10 ** 5))
    toy: bool = prm.option(False, f"build the toy world in {TOY_DIR}/ and sample its CoTs")
    toy_dir: str = prm.option(TOY_DIR, "where the toy world goes")
    allow_outside_images: bool = prm.option(False, "read image paths that lead outside the questions file's folder "
                                            "(absolute paths, '../', links)")


def main(argv=None):
    ap = prm.Parser(__doc__)
    for options in (Sampling, Policy):
        prm.add_options(ap, options)
    args = ap.parse_args(argv)
    prm.one_process("gen_cots.py", "for more GPUs, serve the policy with a serving engine (vLLM, SGLang: one server "
                    "over many GPUs) and sample with --policy openai, many requests in flight (--concurrency)")
    if not args.toy and not args.questions:
        raise prm.DataError("give --questions FILE, or --toy to build and sample the toy world", field="--questions")
    if args.toy:
        paths = build_toy_world(args.toy_dir, args.seed)
        policy = make_policy(args)
        for name, path in paths.items():
            generate(read_questions(path, False), os.path.join(args.toy_dir, f"{name}_cots.jsonl"), policy, args.n,
                     args.seed, args.concurrency, policy.params)
        print(f"toy world written to {args.toy_dir}/ (questions, images, CoTs for train, meta and test)")
        return 0
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.questions)), "cots.jsonl")
    prm.check_output(out, [args.questions])
    questions = read_questions(args.questions, args.allow_outside_images)
    policy = make_policy(args)
    if generate(questions, out, policy, args.n, args.seed, args.concurrency, policy.params):
        print(f"CoTs written to {out}")
    else:
        print(f"nothing left to sample: all {args.n} CoTs of the {len(questions)} questions are in {out} already")
    return 0


if __name__ == "__main__":
    sys.exit(prm.run_cli(main))
