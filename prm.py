"""The process reward model (PRM) and everything the four stages share.

A PRM scores every step of a chain of thought (CoT). For a question x = (t, I) and a CoT with
steps y_1..y_n, the value of the prefix yhat_i = y_1..y_i is

    V_phi(x, yhat_i) = sigmoid(w^T h_i + b)             (README, "The math and the PRM in one screen")

where h_i is the backbone's last hidden state at the last token of step i. Attention is causal, so
h_i depends only on x and yhat_i, and ONE forward pass over the whole CoT gives all n prefix values
("packed scoring", `step_values`). `prefix_values` is the plain reference: one forward per prefix.
A CoT's score is the aggregation A(V_1..V_n) = sigmoid(mean_i logit(V_i)) (`aggregate`).

Read from the top; every stage imports this file and none re-implements it:
  1. The PRM         `split_steps`, `step_segments` (step format), `encode_cot` (segment-wise
                     tokenization: every step end is an exact token position), `collate`,
                     `PRM` (backbone + Linear(hidden, 1) head), `step_values` (packed),
                     `prefix_values` (reference), `shared_prefix_values` (a question's N CoTs
                     with the image and question encoded once), `aggregate`; `Family` and
                     `FAMILIES`: what differs between image-text backbones (Qwen2/2.5/3-VL,
                     InternVL, LLaVA-OneVision, Gemma 3, Idefics3, SmolVLM), chosen at load.
  2. Loading, saving `PRM.from_backbone`, `PRM.from_pretrained`, `PRM.save_pretrained`:
                     safetensors and JSON only, strict checks, a model card.
  3. Answers         `extract_answer`, `match_answer`, `top_answers` and `uniform_choice` (the
                     vote with fair ties): the answer logic every stage uses.
  4. Records         our JSON Lines fields, `check_record` (errors that name file, line and
                     field), record keys.
  5. Formats         `read_cots`: one reader for our JSON Lines and nine public formats (`FORMATS`:
                     PRM800K, ProcessBench, Math-Shepherd, DreamPRM-1.5, VisualPRM400K, RLHFlow,
                     TRL stepwise supervision, the published DreamPRM JSON, VisualProcessBench),
                     each record validated by `check_record`.
  6. Tiny backbone   `tiny_backbone`: a small randomly initialised Qwen2-VL with a locally built
                     tokenizer and Pillow image processor, for the toy world and the tests (the
                     tests' other families are in tests/tiny_families.py).
  7. Plumbing        the shared-prefix cache (`prefix_writer`, `prefix_reader`), `DataError`,
                     the argument parser, atomic files, locks, the PNG line chart: a reader of
                     the method can stop before it.

Quick check:  python -c "import prm; print(prm.aggregate.__doc__)"
"""

import argparse
import ast
import copy
import difflib
import errno
import gc
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import lru_cache, partial

import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file
from tqdm import tqdm


STEP_SEP = "\n"                 # written between steps; each step's last token is its "step end"
FINAL_PREFIX = "Final answer: "  # the structured prompt's answer line, attached to the last step
FINAL_RULES = ("last-step", "drop")   # the final answer line joins the last step, or is never encoded
V_CLAMP = 1e-6                  # logit(V) is taken of V clamped to [V_CLAMP, 1 - V_CLAMP]
MAX_SIDE = 512                  # longest image side before the processor, as the published code has it (Qwen)
IMAGE_CACHE_SIZE = 256          # preprocessed images kept per PRM (a question's N CoTs share one)


# ==============================================================================================
# 1. The PRM: step format, encoding, the value head, scoring, aggregation
# ==============================================================================================

# -- Steps: parse and format -------------------------------------------------------------------

# "Step 3: ...", "### Step 3: ...", "**Step 3**: ..." at the start of a line.
_STEP_RE = re.compile(r"^[ \t]*(?:#+[ \t]*)?(?:\*\*)?Step[ \t]*(\d+)\b", re.IGNORECASE | re.MULTILINE)
_DANGLING_RE = re.compile(r"\n[ \t]*(?:#+|\*\*)[ \t]*$")   # "...\n\n###" where a cut split a heading
_FINAL_RE = re.compile(r"^[ \t]*(?:\*\*)?Final answer(?:\*\*)?[ \t]*[:：](?:\*\*)?[ \t]*", re.IGNORECASE | re.MULTILINE)


@dataclass
class Split:
    steps: list      # [str], empty when the text has no steps
    final: str       # the text after "Final answer:", or "" when there is none
    preamble: str    # text before the first step ("Question: ..." in the published meta set)


def split_steps(text, paragraphs=True):
    """Split a CoT into steps.

    Structured CoTs ("Step k: ..." blocks, then "Final answer: ...") split at each step marker; the
    marker stays in the step text, and a dangling heading mark left at a step's end by a cut before
    the next heading ("###") is dropped. Free-form CoTs (no markers) split into paragraphs at blank
    lines when `paragraphs` is true. The steps end at the first "Final answer:" line and the final
    answer is the text after the last one. A text with no steps gives `steps == []`: callers report
    and skip it, nothing here raises.
    """
    final = ""
    found = list(_FINAL_RE.finditer(text))
    if found:
        final = text[found[-1].end():].strip()
        text = text[:found[0].start()]
    starts = [m.start() for m in _STEP_RE.finditer(text)]
    if starts:
        bounds = starts + [len(text)]
        steps = [_DANGLING_RE.sub("", text[a:b].strip()).strip() for a, b in zip(bounds, bounds[1:])]
        return Split([s for s in steps if s], final, text[:starts[0]].strip())
    if not paragraphs:
        return Split([], final, text.strip())
    steps = [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    return Split(steps, final, "")


def step_segments(steps, final=""):
    """The assistant text as segments, one per step: segment i = separator + step i.

    The final answer line goes into the last step's segment, so the last step's value judges the
    answer too. Tokenizing segment by segment makes every step end an exact token position.
    """
    segments = [(STEP_SEP if i else "") + s for i, s in enumerate(steps)]
    if final and segments:
        segments[-1] += STEP_SEP + FINAL_PREFIX + final
    return segments


def question_text(record):
    """The user-turn text of a question record: the question, then its options if it has any."""
    text = record["question"]
    choices = record.get("choices")
    if choices:
        text += "\nOptions: " + " ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
    return text


# -- Backbone families: what differs between image-text models --------------------------------

def _flat_positions(backbone, ids, image_kwargs):
    """1-D positions: a continuation goes on from the prompt's length. Returns (the prompt's
    position ids, or None for the model's own arange; the continuation's first position)."""
    return None, ids.shape[1]


@dataclass(frozen=True)
class Family:
    """What differs between image-text backbone families, chosen once at load from the config's
    model_type (FAMILIES) and bound to its numbers (`bind_family`). Encoding, scoring, training and
    the hypergradient call these fields and never test a family:
      how an image becomes tensors   the family's image processor (after our resize, image_inputs)
      the prompt's image tokens      the chat template writes `placeholder` once per image;
                                     image_text(tensors, numbers) is the text the family's own
                                     processor puts there, and the features fill `image_token`s
      the forward's image arguments  `tensors` (those in `tiles` have a tile axis, padded across
                                     images in a batch), `token_types` (a (B, L) image-token mask)
      a continuation's positions     prefix_positions(backbone, prompt ids, image arguments): M-RoPE
                                     families continue from the prompt's largest position + 1 on
                                     every axis, the others from the prompt's length
      the vision tower               the backbone's attribute that holds it (--freeze-vision)
      how far images shrink first    `max_side`: MAX_SIDE where shrinking bounds the image tokens
                                     (Qwen, LLaVA-OneVision), None where the family's processor
                                     sets the count itself (a fixed size, a tile grid chosen by the
                                     aspect ratio, an upscale to its own long side)."""
    placeholder: str
    image_token: str
    image_text: object                 # image_text(tensors, numbers) -> str
    numbers_of: object                 # numbers_of(config, image_processor) -> dict, what image_text needs
    tensors: tuple = ("pixel_values",)
    tiles: tuple = ()
    token_types: str = None
    prefix_positions: object = _flat_positions
    vision_tower: str = "vision_tower"
    processor_kwargs: tuple = ()       # (name, value) pairs for the image processor
    pixels_in_processor: bool = False  # min/max pixels bound the processor's own resize (Qwen), else ours
    max_side: int = None               # the default --max-side: shrink first only where it bounds the tokens
    numbers: dict = None               # numbers_of's values for one backbone (bind_family)


# -- Encoding: chat template + segment-wise steps ----------------------------------------------

@dataclass
class Encoded:
    """One CoT ready for the backbone."""
    input_ids: torch.Tensor          # (L,) int64
    step_ends: torch.Tensor          # (S,) int64, position of each step's last token
    prompt_len: int                  # tokens of image + question + assistant header (shared by a question's CoTs)
    images: dict = None              # the image processor's tensors for the CoT's image, or None
    image_mask: torch.Tensor = None  # (L,) 1 at image tokens, 0 elsewhere (None without an image)

    def prefix(self, i):
        """The CoT cut after step i: one step prefix yhat_i, as the per-prefix reference sees it."""
        end = int(self.step_ends[i])
        mask = None if self.image_mask is None else self.image_mask[:end + 1]
        return Encoded(self.input_ids[:end + 1], self.step_ends[i:i + 1], self.prompt_len, self.images, mask)


def image_inputs(image_processor, image, family, max_side=None, min_pixels=None, max_pixels=None):
    """The image processor's tensors for one PIL image (Pillow image processors, no torchvision).

    The image first shrinks (aspect kept) until its longest side is at most max_side pixels, as the
    published DreamPRM code does with 512; min_pixels / max_pixels then bound its pixel count: the
    Qwen processors' own resize takes them (None: the processor's saved values), for the other
    families the image is scaled into the range first, then the family's processor resizes as it
    does. Qwen2-VL: image tokens = grid h * w / merge_size**2, so a 1920x1080 image gives 180 tokens
    at max_side 512 (2,691 with Qwen2-VL's default pixel range).
    """
    image = image.convert("RGB")
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                             Image.Resampling.LANCZOS)
    kwargs = dict(family.processor_kwargs)
    if family.pixels_in_processor and (min_pixels or max_pixels):
        size = image_processor.size
        kwargs["size"] = {"shortest_edge": min_pixels or size["shortest_edge"],
                          "longest_edge": max_pixels or size["longest_edge"]}
    elif min_pixels or max_pixels:
        pixels = image.width * image.height
        scale = math.sqrt((min_pixels or pixels) / pixels) if pixels < (min_pixels or 0) else \
            math.sqrt(max_pixels / pixels) if max_pixels and pixels > max_pixels else 1.0
        if scale != 1.0:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.LANCZOS)
    out = image_processor(images=[image], return_tensors="pt", **kwargs)
    return {k: out[k] for k in out.keys()}


def encode_prompt(tokenizer, question, images=None, family=None):
    """Token ids of the user turn (image, question) and the assistant header, as a list of ints.

    An image-text family's template gets the turn as a list of items, as transformers' processors
    give it (published templates such as Idefics3's and LLaVA-OneVision's print nothing for a plain
    string); a text-only LM's (family None, no image) gets the plain string. The template writes the
    family's placeholder once for the image; it is replaced by the text the family's processor puts
    there (family.image_text: for Qwen2-VL, one <|image_pad|> per merged image patch) and the prompt
    is tokenized whole, as the processor does.
    """
    if images is not None and family is None:
        raise ValueError("an image needs the backbone's Family (PRM.family) to become prompt tokens")
    content = question if family is None else \
        [{"type": "image"}] * (images is not None) + [{"type": "text", "text": question}]
    prompt = chat_prompt(tokenizer, content)
    if images is not None:
        at = prompt.find(family.placeholder)
        if at < 0:
            raise DataError(f"the chat template writes no image placeholder {family.placeholder} for an image item",
                            file=getattr(tokenizer, "template_file", None))
        prompt = prompt[:at] + family.image_text(images, family.numbers) + prompt[at + len(family.placeholder):]
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def chat_prompt(tokenizer, content):
    """The chat template applied to one user turn, with the assistant header; a template that cannot
    render it is one DataError naming the template's file (load_backbone records it)."""
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:
        what = "text" if isinstance(content, str) else "+".join(c["type"] for c in content)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"the chat template cannot render a user turn of {what} ({type(e).__name__}: {first})",
                        file=getattr(tokenizer, "template_file", None)) from None


def encode_cot(tokenizer, question, steps, final="", image=None, image_processor=None, image_cache=None,
               image_limits=None, family=None):
    """Encode one CoT: chat template with the image and question in the user turn, the steps in
    the assistant turn, tokenized segment by segment (`step_segments`).

    `image` is a PIL image, a path, or None; image_limits: max_side, min_pixels, max_pixels for
    `image_inputs`; family: the backbone's bound Family (PRM.family; needed with an image, and for
    an image-text backbone's text-only records, whose template takes list content). Returns an
    `Encoded` whose step_ends[i] is the position of the last token of step i. Raises ValueError for
    a CoT without steps.
    """
    limits = image_limits or {}
    if not steps:
        raise ValueError("a CoT without steps cannot be scored")
    images = None
    if image is not None:
        if image_processor is None:
            raise ValueError("this backbone has no image processor, but the record has an image")
        if family is None:
            raise ValueError("an image needs the backbone's Family (PRM.family) to become prompt tokens")
        if image_cache is not None and isinstance(image, str):
            if image not in image_cache:
                image_cache[image] = image_inputs(image_processor, Image.open(image), **limits, family=family)
                if len(image_cache) > IMAGE_CACHE_SIZE:
                    image_cache.pop(next(iter(image_cache)))    # oldest first: bounded memory
            images = image_cache[image]
        else:
            images = image_inputs(image_processor, Image.open(image) if isinstance(image, str) else image, **limits,
                                  family=family)
    ids = encode_prompt(tokenizer, question, images, family)
    prompt_len = len(ids)
    ends = []
    for seg in step_segments(steps, final):
        seg_ids = tokenizer(seg, add_special_tokens=False)["input_ids"]
        if not seg_ids:
            raise ValueError("empty step")
        ids += seg_ids
        ends.append(len(ids) - 1)
    input_ids = torch.tensor(ids, dtype=torch.long)
    mask = None
    if images is not None:
        mask = (input_ids == tokenizer.convert_tokens_to_ids(family.image_token)).long()
    return Encoded(input_ids, torch.tensor(ends, dtype=torch.long), prompt_len, images, mask)


# -- Collate: right-padded batches -------------------------------------------------------------

def pad_rows(rows, fill=0, width=None, dtype=None, device=None):
    """Rows of different lengths (lists or 1-D tensors) -> one right-padded (B, W) tensor and the
    (B, W) mask of its real entries; W is the longest row, or `width`. Every batch is built so."""
    W = max((len(r) for r in rows), default=0) if width is None else width
    dtype = dtype or (rows[0].dtype if rows and torch.is_tensor(rows[0]) else torch.float32)
    out = torch.full((len(rows), W), fill, dtype=dtype, device=device)
    mask = torch.zeros(len(rows), W, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.as_tensor(r, dtype=dtype)
        mask[b, :len(r)] = True
    return out, mask


def image_batch(images, family):
    """The forward's image tensors for a list of images (processor outputs), in order: each tensor
    concatenated along its first axis, those with a tile axis zero-padded to the most tiles first
    (the model drops all-zero tiles)."""
    out = {}
    for name in family.tensors:
        parts = [x[name] for x in images]
        if name in family.tiles:
            n = max(p.shape[1] for p in parts)
            parts = [torch.cat([p, p.new_zeros((p.shape[0], n - p.shape[1], *p.shape[2:]))], 1) for p in parts]
        out[name] = torch.cat(parts)
    return out


def image_kwargs(family, images, image_mask, dtype):
    """The forward's image arguments from image_batch's tensors: pixels in the model's dtype and,
    where the family takes one, the (B, L) image-token mask under its name."""
    kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in images.items()}
    if family.token_types:
        kwargs[family.token_types] = image_mask
    return kwargs


def collate(cots, pad_id, family=None):
    """Right-pad a list of Encoded into one batch for the backbone.

    Returns a dict with input_ids (B, L), attention_mask (B, L), step_ends (B, S), step_mask (B, S)
    and, when any CoT has an image, its family's image tensors (image_batch) and the (B, L)
    image-token mask. Padded step slots point at position 0 and are masked out.
    """
    input_ids, attention_mask = pad_rows([c.input_ids for c in cots], pad_id)     # (B, L)
    step_ends, step_mask = pad_rows([c.step_ends for c in cots])                  # (B, S)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask.long(), step_ends=step_ends,
                 step_mask=step_mask)
    with_image = [c for c in cots if c.images is not None]
    if with_image:
        mask = [c.image_mask if c.image_mask is not None else torch.zeros_like(c.input_ids) for c in cots]
        batch["images"] = image_batch([c.images for c in with_image], family)
        batch["image_mask"] = pad_rows(mask, 0, input_ids.shape[1], torch.long)[0]   # (B, L)
    return batch


# -- The model: backbone + value head ----------------------------------------------------------

class PRM(nn.Module):
    """Backbone + value head. V_phi(x, yhat_i) = sigmoid(w^T h_i + b).

    The backbone is loaded with AutoModel (Qwen2-VL, Qwen2.5-VL and other image-text models give
    their base model with last hidden states and no LM head; text-only causal LMs give theirs),
    so no vocabulary-sized logits are ever computed.
    """

    def __init__(self, backbone, tokenizer, image_processor=None, seed=0):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        # How this backbone's family takes images (Family): chosen once, here; None for a text-only LM.
        self.family = bind_family(backbone.config, image_processor) if image_processor is not None else None
        hidden = backbone.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1)                         # w, b; seeded so runs repeat exactly
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.normal_(0.0, hidden ** -0.5, generator=g)
            self.head.bias.zero_()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.image_cache = {}
        self.encodings = object()            # marks the encodings records keep for this PRM (encode(cache=True))
        # How records become inputs; saved in prm.json so that scoring reads CoTs as training did.
        self.final_answer = "last-step"          # FINAL_RULES
        self.max_side = self.family.max_side if self.family else None    # the family's default (Family)
        self.min_pixels, self.max_pixels = None, None
        self.max_length = backbone.config.get_text_config().max_position_embeddings   # longer CoTs are skipped
        self.aggregation = "mean_logit"          # the A of the upper loss: rerank.py's default

    def encode(self, record, image_root=None, cache=False):
        """Encode a record (a CoTs file line: 'image' a path under image_root or null; or as the readers
        return it: '_image', '_question'); an unusable image is a DataError. cache (training): a text-only
        record keeps its encoding in record["_enc"], images share the bounded image cache."""
        kept = record.get("_enc") if cache else None
        if kept and kept[0] is self.encodings and kept[1] == self.final_answer:
            return kept[2]
        image = record["_image"] if "_image" in record else record_image(record.get("image"), image_root)
        final = (record.get("final") or "") if self.final_answer == "last-step" else ""
        e = encode_cot(self.tokenizer, record["_question"] if "_question" in record else question_text(record),
                       record["steps"], final, image, self.image_processor, self.image_cache,
                       dict(max_side=self.max_side, min_pixels=self.min_pixels, max_pixels=self.max_pixels),
                       self.family)
        if cache and image is None:
            record["_enc"] = (self.encodings, self.final_answer, e)
        return e

    def fits(self, encoded):
        """Whether an encoded CoT fits max_length; longer ones are skipped and counted, never cut."""
        return len(encoded.input_ids) <= self.max_length

    def hidden(self, batch):
        """Last hidden states (B, L, H) of a collated batch."""
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        if "images" in batch:
            kwargs.update(self.image_kwargs(batch["images"], batch["image_mask"]))
        return self.backbone(**kwargs).last_hidden_state

    def image_kwargs(self, images, image_mask):
        return image_kwargs(self.family, images, image_mask, self.backbone.dtype)

    def value(self, h):
        """V = sigmoid(w^T h + b) for hidden states h (..., H) -> (...)."""
        return torch.sigmoid(self.head(h.to(self.head.weight.dtype)).squeeze(-1))

    @property
    def device(self):
        return self.head.weight.device

    # Loading and saving (section 2 holds the code).
    @classmethod
    def from_backbone(cls, path, dtype=torch.float32, seed=0, trust_remote_code=False, attn_implementation=None,
                      device="cpu"):
        """A fresh PRM (new value head) on a backbone saved with save_pretrained in `path`, on
        `device`. attn_implementation: None (transformers' default, sdpa), or "eager" where double
        backward through attention is needed (the hypergradient test)."""
        model = cls(*load_backbone(path, dtype, trust_remote_code, attn_implementation), seed=seed).to(device)
        check_image_tokens(model, path)
        return model

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, trust_remote_code=False, device="cpu"):
        """Load a PRM written by save_pretrained (or the run directory of bilevel_train.py, which
        holds it in prm/), on `device`. A directory without the PRM files is a DataError."""
        return load_prm(cls, path, dtype, trust_remote_code, device)

    def save_pretrained(self, path, card=None, state=None):
        """Write backbone (safetensors), tokenizer, image processor, prm.safetensors, prm.json (all
        that scoring needs) and a README.md model card (`card`: extra lines about training).
        Written into a temporary directory first, then renamed: a crash never leaves half a PRM.
        state: the PRM's whole state dict, when its parameters are sharded over processes."""
        save_prm(self, path, card, state)

    def settings(self):
        """Everything scoring needs to read a CoT as training did (saved in prm.json)."""
        return dict(final_answer=self.final_answer, max_side=self.max_side, min_pixels=self.min_pixels,
                    max_pixels=self.max_pixels, max_length=self.max_length, aggregation=self.aggregation)


# -- Scoring -----------------------------------------------------------------------------------

def _to(batch, device):
    """A batch (tensors, and dicts of tensors) on a device."""
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


def step_values(prm, cots):
    """Packed scoring, ONE forward for a batch: B Encoded CoTs -> values (B, S) and mask (B, S) (values
    at masked, padding, slots are meaningless)."""
    batch = _to(collate(cots, prm.pad_id, prm.family), prm.device)
    h = prm.hidden(batch)                                        # (B, L, H)
    idx = batch["step_ends"].unsqueeze(-1).expand(-1, -1, h.shape[-1])
    h_steps = torch.gather(h, 1, idx)                            # (B, S, H) hidden state at each step end
    return prm.value(h_steps), batch["step_mask"]                # (B, S), (B, S)


# Tokens per packed scoring forward on a CPU, per thread: past a few hundred tokens a thread's share
# of a batch's activations leaves the caches, and its elementwise work and attention run slower per
# token than one CoT's (one thread, 8 CoTs of 645 tokens on the 9.8 M bench backbone: one forward
# 1.80 s, one forward each 1.64 s; tests/bench.py --only packing). A GPU takes the whole batch.
CPU_TOKENS_PER_THREAD = 512


def scoring_budget(device):
    """Tokens per packed scoring forward on `device`: CPU_TOKENS_PER_THREAD per thread on a CPU,
    None (the whole batch) elsewhere."""
    return CPU_TOKENS_PER_THREAD * torch.get_num_threads() if torch.device(device).type == "cpu" else None


def token_batches(cots, budget):
    """The indices of `cots` in consecutive groups whose padded batch holds at most `budget` tokens
    (a longer CoT alone; budget None: one group), for packed scoring in forwards of that size."""
    groups, width = [], 0
    for i, c in enumerate(cots):
        width = max(width, len(c.input_ids))
        if not groups or (budget is not None and width * (len(groups[-1]) + 1) > budget):
            groups.append([])
            width = len(c.input_ids)
        groups[-1].append(i)
    return groups


def prefix_values(prm, cots):
    """Reference scoring: one forward per step prefix, the value read at its last position.
    Same output as step_values; it exists for tests and as the cost baseline."""
    rows = [torch.stack([step_values(prm, [c.prefix(i)])[0][0, 0] for i in range(len(c.step_ends))])
            for c in cots]                                       # one (S_b,) row per CoT
    return pad_rows(rows, 0.0, dtype=torch.float32, device=prm.device)     # (B, S), (B, S)


def shared_prefix_values(prm, cots):
    """Shared-prefix scoring for the N CoTs of ONE question: the image and question (the prompt,
    identical in every CoT) are encoded once, then the N continuations run as one batch against
    the cached prefix. Same values as step_values, at about 1/N of the prompt's cost.

    Positions: a continuation starts where its prefix ends, start + arange(L) (the family's
    prefix_positions gives start: the prompt's length, or for M-RoPE families its largest position
    + 1, the same on all three axes). Returns values (N, S) and mask (N, S).
    """
    P = cots[0].prompt_len
    prefix = cots[0].input_ids[:P]
    for c in cots:
        if c.prompt_len != P or not torch.equal(c.input_ids[:P], prefix) or \
                (c.images is None) != (cots[0].images is None):
            raise ValueError("shared_prefix_values needs CoTs of one question (the same prompt and image)")
    device, N = prm.device, len(cots)
    ids = prefix[None].to(device)                                               # (1, P)
    kwargs = dict(input_ids=ids, use_cache=True)
    start = P
    if cots[0].images is not None:
        mask = cots[0].image_mask[:P][None].to(device)                          # (1, P) image tokens
        kwargs.update(prm.image_kwargs(_to(image_batch([cots[0].images], prm.family), device), mask))
        position_ids, start = prm.family.prefix_positions(prm.backbone, ids, kwargs)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids                                 # (3, 1, P) for M-RoPE
    # transformers renamed past_key_values to cache (5.2x); pass whichever this version takes.
    cache_kw = "cache" if "cache" in inspect.signature(prm.backbone.forward).parameters else "past_key_values"
    prefix_cache = prefix_writer(prm.backbone.config)
    prm.backbone(**kwargs, **{cache_kw: prefix_cache})
    cache = prefix_reader(prefix_cache, N)          # the prefix, N times, read-only (both: section 7)
    cont, cont_mask = pad_rows([c.input_ids[P:] for c in cots], prm.pad_id)     # (N, L) the continuations
    L = cont.shape[1]
    attention_mask = torch.cat([torch.ones(N, P, dtype=torch.long), cont_mask.long()], 1)   # (N, P + L)
    position_ids = (start + torch.arange(L)).expand(N, L)                       # (N, L), same on t, h, w
    h = prm.backbone(input_ids=cont.to(device), attention_mask=attention_mask.to(device),
                     position_ids=position_ids.to(device), use_cache=True, **{cache_kw: cache}).last_hidden_state
    ends, mask = pad_rows([c.step_ends - P for c in cots])                       # (N, S)
    h_steps = torch.gather(h, 1, ends.to(device).unsqueeze(-1).expand(-1, -1, h.shape[-1]))   # (N, S, H)
    return prm.value(h_steps), mask.to(device)


def mean_logit(values, mask):
    """The paper's aggregation A: sigmoid((1/n) sum_i logit(V_i)) over each CoT's steps, V clamped to
    [1e-6, 1-1e-6], padding slots (mask False) ignored: (B, S) values and mask -> (B,)."""
    m = mask.to(values.device).to(values.dtype)
    V = values.clamp(V_CLAMP, 1 - V_CLAMP)
    return torch.sigmoid((torch.logit(V) * m).sum(-1) / m.sum(-1).clamp(min=1))


def aggregate(values, mask, how="mean_logit"):
    """Aggregation function A over each CoT's steps: (B, S) values and mask -> (B,).

    mean_logit: the paper's A (mean_logit, above)
    min, prod, last, mean: the usual alternatives. Padding slots (mask False) are ignored.
    """
    if how == "mean_logit":
        return mean_logit(values, mask)
    mask = mask.to(values.device)
    if how == "mean":
        m = mask.to(values.dtype)
        return (values * m).sum(-1) / m.sum(-1).clamp(min=1)
    if how == "min":
        return values.masked_fill(~mask, float("inf")).min(-1).values
    if how == "prod":
        return values.masked_fill(~mask, 1.0).prod(-1)
    if how == "last":
        last = (mask.long().sum(-1) - 1).clamp(min=0)            # (B,)
        return values.gather(1, last.unsqueeze(1)).squeeze(1)
    raise ValueError(f"unknown aggregation {how!r}; choose from {AGGREGATIONS}")


AGGREGATIONS = ("mean_logit", "min", "prod", "last", "mean")


# -- Family rules: each family's image tokens, positions and numbers (the Family rows) ---------

def _mrope_positions(backbone, ids, image_kwargs):
    """M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the prompt's (3, 1, P) positions from the model's
    get_rope_index (an image's tokens take 2-D grid positions); a continuation goes on from their
    largest + 1 on every axis (text after the image)."""
    position_ids, _ = backbone.get_rope_index(input_ids=ids, mm_token_type_ids=image_kwargs["mm_token_type_ids"],
                                              image_grid_thw=image_kwargs["image_grid_thw"])
    return position_ids, int(position_ids.max()) + 1


def _side(x):
    """An image or patch size that a config gives as an int or as (height, width)."""
    return x[0] if isinstance(x, (list, tuple)) else x


def _qwen_text(t, n):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the template's <|image_pad|> (between <|vision_start|> and
    <|vision_end|>) becomes grid t * h * w / merge_size**2 pad tokens, one per merged patch."""
    return "<|image_pad|>" * (int(t["image_grid_thw"].prod()) // n["merge"] ** 2)


def _internvl_text(t, n):
    """InternVL: <img>, then IMG_CONTEXT x tokens per tile x tiles (the thumbnail counts), </img>."""
    return "<img>" + "<IMG_CONTEXT>" * (n["per_tile"] * int(t["num_patches"].sum())) + "</img>"


def _llava_onevision_text(t, n):
    """LLaVA-OneVision (one image: anyres): the base image's tokens, the unpadded grid of the best
    resolution's patches with one newline token per row, reduced when over anyres_max_N patches;
    one less with the 'default' feature strategy. The count of its processor's _get_number_of_features."""
    from transformers.image_processing_utils import select_best_resolution
    orig_h, orig_w = (int(x) for x in t["image_sizes"][0])
    height, width = t["pixel_values"].shape[-2:]
    best_h, best_w = select_best_resolution([orig_h, orig_w], n["pinpoints"])
    side = int(math.sqrt(n["base"]))
    cur_h, cur_w = side * (best_h // height), side * (best_w // width)
    if orig_w / orig_h > cur_w / cur_h:
        cur_h -= (cur_h - int(round(orig_h * (cur_w / orig_w), 7))) // 2 * 2
    else:
        cur_w -= (cur_w - int(round(orig_w * (cur_h / orig_h), 7))) // 2 * 2
    unpadded, newlines = cur_h * cur_w, cur_h
    ratio = math.sqrt(cur_h * cur_w / (n["max_patches"] * side ** 2))
    if ratio > 1.1:
        unpadded, newlines = int(cur_h // ratio) * int(cur_w // ratio), int(cur_h // ratio)
    return "<image>" * (unpadded + newlines + n["base"] - (n["strategy"] == "default"))


def _gemma3_text(t, n):
    """Gemma 3: the template's <start_of_image> becomes a blank line, <start_of_image>, the image's
    mm_tokens_per_image soft tokens, <end_of_image> and a blank line."""
    return "\n\n<start_of_image>" + "<image_soft_token>" * n["tokens"] + "<end_of_image>\n\n"


def _idefics3_text(t, n):
    """Idefics3 and SmolVLM: a split image is its grid of tiles, each <fake_token_around_image>
    <row_r_col_c> and the tile's image tokens, a newline after each row, then a blank line and the
    global image <fake_token_around_image><global-img> tokens <fake_token_around_image>; an unsplit
    image is the global image alone."""
    rows, cols, seq = int(t["rows"][0][0]), int(t["cols"][0][0]), "<image>" * n["seq"]
    grid = "".join("".join(f"<fake_token_around_image><row_{r + 1}_col_{c + 1}>{seq}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return (grid + "\n" if rows or cols else "") + f"<fake_token_around_image><global-img>{seq}<fake_token_around_image>"


_QWEN = Family("<|image_pad|>", "<|image_pad|>", _qwen_text, lambda c, ip: {"merge": getattr(ip, "merge_size", 2)},
               ("pixel_values", "image_grid_thw"), token_types="mm_token_type_ids", prefix_positions=_mrope_positions,
               vision_tower="visual", pixels_in_processor=True, max_side=MAX_SIDE)
_IDEFICS3 = Family("<image>", "<image>", _idefics3_text, lambda c, ip: {"seq": int(
    (_side(c.vision_config.image_size) // _side(c.vision_config.patch_size)) ** 2 / c.scale_factor ** 2)},
    ("pixel_values", "pixel_attention_mask"), tiles=("pixel_values", "pixel_attention_mask"),
    processor_kwargs=(("return_row_col_info", True),), vision_tower="vision_model")
# model_type -> Family: the image-text backbones this code builds inputs for, each tested against its
# family's processor (or its processing rule) for prompts and packed = per-prefix = shared-prefix values.
FAMILIES = {
    "qwen2_vl": _QWEN, "qwen2_5_vl": _QWEN, "qwen3_vl": _QWEN,
    "internvl": Family("<IMG_CONTEXT>", "<IMG_CONTEXT>", _internvl_text, lambda c, ip: {"per_tile": int(
        (_side(c.vision_config.image_size) // _side(c.vision_config.patch_size)) ** 2 * c.downsample_ratio ** 2)},
        processor_kwargs=(("crop_to_patches", True),)),
    "llava_onevision": Family("<image>", "<image>", _llava_onevision_text, lambda c, ip: dict(
        base=(c.vision_config.image_size // c.vision_config.patch_size) ** 2, strategy=c.vision_feature_select_strategy,
        pinpoints=ip.image_grid_pinpoints, max_patches=int(c.vision_aspect_ratio.removeprefix("anyres_max_"))),
        ("pixel_values", "image_sizes"), tiles=("pixel_values",), max_side=MAX_SIDE),
    "gemma3": Family("<start_of_image>", "<image_soft_token>", _gemma3_text, lambda c, ip: {"tokens": c.mm_tokens_per_image},
                     token_types="token_type_ids"),
    "idefics3": _IDEFICS3, "smolvlm": _IDEFICS3,
}


def bind_family(config, image_processor):
    """The Family of an image-text config, with its numbers (tokens per image or tile, ...)."""
    family = FAMILIES[config.model_type]
    return replace(family, numbers=family.numbers_of(config, image_processor))


# ==============================================================================================
# 2. Loading and saving a PRM (strict checks, the model card)
# ==============================================================================================

PRM_FORMAT = 2                  # version of prm.json
# Image-text families refused, with why (the README's backbone table says more).
REFUSED_FAMILIES = {"mllama": "Llama-3.2-Vision feeds the image to cross-attention layers, not as prompt tokens, so "
                              "a question's image and text cannot be encoded once and shared by its CoTs as this "
                              "code scores and trains",
                    "internvl_chat": "the remote-code form of InternVL (OpenGVLab's InternVL2.5, InternVL3 and "
                                     "VisualPRM-8B); load the transformers-native '-hf' conversion of the same weights "
                                     "instead, e.g. OpenGVLab/InternVL3-1B-hf or OpenGVLab/InternVL3-8B-hf (model type "
                                     "internvl)"}


def _quiet_transformers():
    """Loading and saving print load reports and progress bars; keep script output readable."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _is_prm_dir(path):
    return os.path.isfile(os.path.join(path, "prm.json")) and os.path.isfile(os.path.join(path, "prm.safetensors"))


def load_backbone(path, dtype=torch.float32, trust_remote_code=False, attn_implementation=None):
    """(backbone, tokenizer, image processor or None) from a directory written by save_pretrained.
    Weights that do not match the config (missing, unexpected, wrong shape) are a DataError; a base
    model loaded from a checkpoint with an LM head leaves that head out."""
    from transformers import AutoModel, AutoTokenizer
    _quiet_transformers()
    vision = check_backbone(path)
    check_safetensors(path)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    backbone = load_weights(AutoModel, path, "the backbone", ("lm_head",), dtype=dtype,
                            trust_remote_code=trust_remote_code, **extra)
    with _load_errors(path, "the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    use_chat_template(tokenizer, path, vision)
    image_processor = None
    if vision:
        from transformers import AutoImageProcessor
        with _load_errors(path, "the image processor"):
            image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return backbone, tokenizer, image_processor


def load_weights(auto, path, what, may_leave=(), **kwargs):
    """auto.from_pretrained(path) from safetensors, strictly: weights that do not match the model's
    config (missing, unexpected, wrong shape) are one DataError, never a freshly initialised tensor.
    `may_leave`: names of checkpoint modules this model class has no place for (a base model loaded
    from a checkpoint with an LM head leaves the head out, wherever the family's checkpoint puts it)."""
    with _load_errors(path, what):
        model, info = auto.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True,
                                           use_safetensors=True, **kwargs)
    bad = {"missing": sorted(info["missing_keys"]),
           "unexpected": sorted(k for k in info["unexpected_keys"] if not set(k.split(".")) & set(may_leave)),
           "wrong shape": sorted(" ".join(map(str, k)) if isinstance(k, tuple) else str(k)
                                 for k in info["mismatched_keys"])}
    if any(bad.values()):
        raise DataError(f"{what}: weights do not match the model's config: " + "; ".join(
            f"{why} {', '.join(keys[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            for why, keys in bad.items() if keys), file=path)
    return model


def prm_directory(path):
    """The PRM directory a path names: itself, or the prm/ inside a bilevel_train.py run directory
    (a replacement cut short by a crash recovered first)."""
    recover_dir(path)
    recover_dir(os.path.join(path, "prm"))
    if not _is_prm_dir(path) and _is_prm_dir(os.path.join(path, "prm")):
        return os.path.join(path, "prm")
    return path


def load_prm(cls, path, dtype=torch.float32, trust_remote_code=False, device="cpu"):
    """PRM.from_pretrained: the backbone, then the value head and the reading settings of prm.json."""
    path = prm_directory(path)
    if not _is_prm_dir(path) and any(os.path.exists(os.path.join(path, n)) for n in ("config.json", "checkpoint")) \
            and os.path.isfile(os.path.join(path, "run.lock")):
        how = "--resume to finish it" if os.path.isdir(os.path.join(path, "checkpoint")) else \
            "--overwrite to start it again (it stopped before its first checkpoint)"
        raise DataError(f"a bilevel_train.py run that has not finished (no prm/ yet): rerun its command with {how} "
                        "(its flags are in config.json; the toy demo's is python bilevel_train.py)", file=path)
    if not _is_prm_dir(path):
        raise DataError("not a PRM directory (needs prm.json and prm.safetensors; "
                        "a plain backbone is loaded with --model, not as a PRM)", file=path)
    meta = _read_prm_json(os.path.join(path, "prm.json"))
    prm = cls.from_backbone(path, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    head_file = os.path.join(path, "prm.safetensors")
    with _load_errors(head_file, "the value head"):
        head = load_file(head_file)
    H = prm.head.in_features
    extra = sorted(set(head) - {"head.weight", "head.bias"})
    if extra:
        raise DataError(f"unknown tensor(s) {', '.join(extra[:3])}: a value head holds head.weight and head.bias",
                        file=head_file)
    for name, shape in (("head.weight", (1, H)), ("head.bias", (1,))):
        if name not in head or tuple(head[name].shape) != shape:
            got = tuple(head[name].shape) if name in head else "missing"
            raise DataError(f"tensor {name}: expected shape {shape}, found {got}", file=head_file)
        if not torch.isfinite(head[name]).all():
            raise DataError(f"tensor {name} holds NaN or infinite values", file=head_file)
    prm.head.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
    for key in ("final_answer", "max_side", "min_pixels", "max_pixels", "max_length", "aggregation"):
        if key in meta:
            setattr(prm, key, meta[key])
    return prm


def _read_prm_json(path):
    """prm.json, checked field by field: a reading setting this code does not know would score CoTs
    otherwise than training read them."""
    meta = read_json_object(path)
    checks = {"format": lambda v: v in (1, PRM_FORMAT), "step_sep": lambda v: v == STEP_SEP,
              "final_answer": lambda v: v in FINAL_RULES, "aggregation": lambda v: v in AGGREGATIONS,
              "max_side": lambda v: v is None or (type(v) is int and v >= 0),
              "min_pixels": lambda v: v is None or (type(v) is int and v >= 1),
              "max_pixels": lambda v: v is None or (type(v) is int and v >= 1),
              "max_length": lambda v: type(v) is int and v >= 1}
    expected = {"format": f"1 or {PRM_FORMAT} (the versions this code reads)", "step_sep": repr(STEP_SEP),
                "final_answer": " or ".join(FINAL_RULES), "aggregation": ", ".join(AGGREGATIONS),
                "max_side": "an integer >= 0 or null", "min_pixels": "an integer >= 1 or null",
                "max_pixels": "an integer >= 1 or null", "max_length": "an integer >= 1"}
    for key, ok in checks.items():
        if key in meta and not ok(meta[key]):
            raise DataError(f"{meta[key]!r}: expected {expected[key]}", file=path, field=key)
    if "format" not in meta:
        raise DataError("missing required field", file=path, field="format")
    return meta


def save_prm(prm, path, card=None, state=None):
    """PRM.save_pretrained: everything into path.tmp, then one rename (atomic_dir)."""
    import transformers
    _quiet_transformers()
    state = state or {"head.weight": prm.head.weight.detach(), "head.bias": prm.head.bias.detach()}
    with naming(path), atomic_dir(path) as tmp:
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        prm.backbone.save_pretrained(tmp, **({"state_dict": backbone} if backbone else {}))
        prm.tokenizer.save_pretrained(tmp)
        if prm.image_processor is not None:
            prm.image_processor.save_pretrained(tmp)
        save_file({"head.weight": state["head.weight"].float().contiguous(),
                   "head.bias": state["head.bias"].float().contiguous()},
                  os.path.join(tmp, "prm.safetensors"))
        meta = dict(format=PRM_FORMAT, backbone_class=type(prm.backbone).__name__,
                    model_type=prm.backbone.config.model_type, hidden_size=prm.head.in_features,
                    head="V = sigmoid(head.weight @ h + head.bias), h = the backbone's last hidden state at "
                         "the last token of a step; prm.safetensors holds head.weight (1, hidden) and head.bias (1,)",
                    prompt="chat template; user turn: the image, then the question (and 'Options: (A) ...'); "
                           "assistant turn: the steps joined by step_sep, each step's last token is its step end",
                    step_sep=STEP_SEP, final_prefix=FINAL_PREFIX, **prm.settings(),
                    code=dict(project="DreamPRM reference implementation", commit=code_version()),
                    versions=dict(torch=torch.__version__, transformers=transformers.__version__))
        with open(os.path.join(tmp, "prm.json"), "w") as f:
            json.dump(meta, f, indent=1)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(meta, card or []))
        readable(tmp)


def check_backbone(path):
    """Stop at load, with one line, on a directory this code cannot use. Returns whether the
    backbone is an image-text model (else a text-only causal LM)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise DataError("not a model directory (no config.json)", file=path)
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"unreadable config ({e})", file=config_file) from None
    model_type = config.get("model_type")
    if "vision_config" in config and model_type not in FAMILIES:
        why = f" ({REFUSED_FAMILIES[model_type]})" if model_type in REFUSED_FAMILIES else ""
        raise DataError(f"model type {model_type!r} is not supported{why}; supported backbones: the image-text "
                        f"families {', '.join(FAMILIES)}, and text-only causal LMs", file=config_file)
    return "vision_config" in config


def check_image_tokens(prm, path):
    """Stop at load, with one line, where one image's image tokens (made by the family's processor
    and chat template) and its features (made by the vision tower) differ in number: a config that
    disagrees with itself (Gemma 3's mm_tokens_per_image against its vision tower's pooling, a
    processor's merge or tile size against the model's) would otherwise fail at the first image.
    The backbone runs on one small image up to its decoder, which never runs."""
    if prm.family is None:
        return
    e = encode_cot(prm.tokenizer, "?", ["?"], "", Image.new("RGB", (64, 64), (90, 140, 200)), prm.image_processor,
                   image_limits=dict(max_side=prm.max_side), family=prm.family)
    stop = prm.backbone.get_decoder().register_forward_pre_hook(_stop_before_decoder)
    try:
        with torch.no_grad():
            prm.hidden(_to(collate([e], prm.pad_id, prm.family), prm.device))
    except _BeforeDecoder:
        return
    except Exception as err:
        if "do not match" not in str(err):
            raise
        raise DataError(f"the config disagrees with itself: one image makes {int(e.image_mask.sum())} image tokens "
                        f"(its processor and chat template) and the model says '{str(err).splitlines()[0][:200]}' "
                        "(check the image token numbers of config.json, e.g. mm_tokens_per_image, against its "
                        "vision_config and the image processor's sizes)", file=path) from None
    finally:
        stop.remove()


class _BeforeDecoder(Exception):
    pass


def _stop_before_decoder(module, args):
    raise _BeforeDecoder


def check_safetensors(path):
    """Weights are read from safetensors only: a directory whose weights are pickle files
    (pytorch_model.bin, *.pt) is refused, never loaded (a pickle can run code)."""
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") and n != "prm.safetensors" for n in names):
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
        raise DataError("no safetensors weights" + (f" (found {', '.join(sorted(pickles)[:3])}: pickle files are never "
                        "loaded; convert them to safetensors where you trust them)" if pickles else ""), file=path)


class _load_errors:
    """`with _load_errors(path, what):` a failure to load becomes one DataError line naming the file."""

    def __init__(self, path, what):
        self.path, self.what = path, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or issubclass(exc_type, DataError) or not issubclass(exc_type, Exception):
            return False
        first = (str(exc).strip().splitlines() or [exc_type.__name__])[0]
        raise DataError(f"cannot load {self.what}: {first[:300]}", file=self.path) from None


def use_chat_template(tokenizer, path, vision):
    """Give the tokenizer the chat template that the checkpoint's processor would take, and record
    its file in tokenizer.template_file (for error messages). A folder may hold two templates: the
    processor's (processor_config.json's "chat_template", else chat_template.json, else
    chat_template.jinja) and the tokenizer's (chat_template.jinja, else tokenizer_config.json), and
    they can differ (some published copies of Qwen2.5-VL pair a text-only tokenizer template with
    the image-text processor one). An image-text backbone takes the processor's first, as
    transformers' processors do; a text-only LM the tokenizer's."""
    processor = ("processor_config.json", "chat_template.json", "chat_template.jinja") if vision else ()
    for name in processor + ("chat_template.jinja", "tokenizer_config.json", "chat_template.json"):
        template = _template_in(os.path.join(path, name))
        if template:
            tokenizer.chat_template, tokenizer.template_file = template, os.path.join(path, name)
            return
    raise DataError("the tokenizer has no chat template", file=path)


def _template_in(path):
    """The chat template a file holds (a .jinja file, or a JSON file's "chat_template": a string, or
    named templates of which the "default" one), or None."""
    if not os.path.isfile(path):
        return None
    if path.endswith(".jinja"):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = read_json_object(path).get("chat_template")
    if isinstance(template, list):                       # tokenizer_config.json: [{"name", "template"}]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    return template.get("default") if isinstance(template, dict) else template


def record_image(image, image_root=None):
    """A record's image path resolved against image_root (default: the current folder), checked to
    be an image that decodes; None for a text-only record."""
    if image is None:
        return None
    if not isinstance(image, str):
        raise DataError("must be a path or null", field="image")
    path = os.path.abspath(os.path.join(image_root or ".", image))
    problem = _check_image(path)
    if problem:
        raise DataError(problem, field="image")
    return path


def code_version():
    """The commit of the checkout this code runs from ('unknown' outside a git checkout)."""
    import subprocess
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_card(meta, lines):
    """README.md of a PRM directory: what it is, how it was trained (`lines`), how to score with it."""
    return "\n".join([
        "# Process reward model (DreamPRM)", "",
        f"A process reward model on a {meta['model_type']} backbone ({meta['backbone_class']}): for a question "
        "(image and text) and a chain of thought split into steps, it gives every step a value in (0, 1), the "
        "estimated chance that a solution continuing from that step reaches the right answer. A CoT's score "
        f"is the aggregation `{meta['aggregation']}` of its step values; the best of N CoTs is the one with "
        "the highest score.", "",
        "## Training", "", *lines, "",
        "## Reading a CoT as in training", "",
        f"- steps joined by {meta['step_sep']!r}; final answer line: {meta['final_answer']}",
        f"- images: longest side at most {meta['max_side'] or 'any'} px, then "
        + ("the image processor's own pixel range" if meta["min_pixels"] is None and meta["max_pixels"] is None else
           f"min/max pixels {meta['min_pixels'] or 'the processor own'} / {meta['max_pixels'] or 'the processor own'}")
        + f"; CoTs over {meta['max_length']} tokens are skipped",
        "", "## Scoring", "",
        f"The code: `prm.py` of the DreamPRM reference implementation, commit {meta['code']['commit']} (prm.json "
        f"format {meta['format']}), with torch, transformers, safetensors and pillow installed. Put the folder that "
        "holds `prm.py` on the Python path; then, from any folder:", "", "```python",
        "import sys",
        "sys.path.insert(0, \"CODE_FOLDER\")                     # the folder that holds prm.py",
        "import prm",
        "model = prm.PRM.from_pretrained(\"THIS_DIRECTORY\").eval()",
        "# a line of a CoTs file; \"image\" is a path relative to image_root, or None for a text-only question",
        "cot = {\"question\": \"What is 3 + 4?\", \"steps\": [\"Step 1: 3 + 4 = 7.\"], \"final\": \"7\", \"image\": None}",
        "values, mask = prm.step_values(model, [model.encode(cot, image_root=\".\")])   # (1, S) step values",
        "print(prm.aggregate(values, mask, model.aggregation).item())                # the CoT's score",
        "```", ""])


# ==============================================================================================
# 3. Answers: the answer a CoT gives, matching it to a key, the vote with fair ties
# ==============================================================================================

# The answer line a CoT ends with, in the forms the public formats write it.
_ANSWER_RES = [re.compile(r"^[ \t]*#+[ \t]*Answer[ \t]*\n\s*(\S[^\n]*)", re.IGNORECASE | re.MULTILINE),    # PRM800K
               re.compile(r"^[ \t]*(?:\*\*)?Answer(?:\*\*)?[ \t]*[:：][ \t]*(\S[^\n]*)", re.IGNORECASE | re.MULTILINE),
               re.compile(r"\bthe answer is[ \t]*[:：]?[ \t]*(\S[^\n]*)", re.IGNORECASE)]


def extract_answer(text):
    """The answer a CoT gives, one rule for every format: the first line after the last 'Final
    answer:'; else the line after a '# Answer' heading (PRM800K), after 'Answer:', or after 'The
    answer is' (Math-Shepherd), the last one in the text; else the CoT's last non-empty line."""
    final = split_steps(text).final
    if final:
        return final.splitlines()[0].strip()
    for pattern in _ANSWER_RES:
        found = pattern.findall(text)
        if found:
            return found[-1].strip().rstrip(".").strip()
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""



_NUM_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def normalize(s):
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s.\-]", " ", str(s).lower())).strip()


def to_number(s):
    m = _NUM_RE.search(str(s))
    return float(m.group().replace(",", "")) if m else None


def match_answer(pred, answer, choices=None, rel_tol=1e-3):
    """Whether pred matches the answer key.

    Multiple choice: pred is read as a letter ('B', '(B)', 'B.', 'B: dog'), else as the option its
    text equals or contains, else the nearest option text (difflib ratio >= 0.5); the key is read
    the same way. Numbers: equal within rel_tol, or equal once rounded to the key's decimals
    ('3.14159' matches '3.14'; '1,000' matches '1000'; a unit after the key is allowed).
    Otherwise the normalized strings (case, punctuation, whitespace) must be equal.
    """
    pred_n, ans_n = normalize(pred), normalize(answer)
    if choices:
        letters = [chr(65 + i) for i in range(len(choices))]

        def as_letter(s, raw):
            m = re.fullmatch(r"\(?([a-z])\)?\.?", s)
            if m and m.group(1).upper() in letters:
                return m.group(1).upper()
            m = re.match(r"^\(?([A-Z])\)[ .:]", raw.strip()) or re.match(r"^([A-Z])[.:] ", raw.strip())
            if m and m.group(1) in letters:
                return m.group(1)
            opts = [normalize(c) for c in choices]
            if s in opts:
                return letters[opts.index(s)]
            close = [i for i, o in enumerate(opts) if o and (o in s or s in o)]
            if len(close) == 1:
                return letters[close[0]]
            ratios = [difflib.SequenceMatcher(None, s, o).ratio() for o in opts]
            best = max(ratios)
            return letters[ratios.index(best)] if best >= 0.5 and ratios.count(best) == 1 else None

        a, p = as_letter(ans_n, str(answer)), as_letter(pred_n, str(pred))
        if a is not None:
            return p == a
    ans_raw = str(answer).strip().lower()
    x, y = to_number(str(pred)), to_number(ans_raw)
    if x is not None and y is not None and re.fullmatch(r"-?[\d,]+(\.\d+)?\s*\w*", ans_raw):
        digits = len(ans_raw.split(".")[1].split()[0]) if "." in ans_raw.split()[0] else 0
        return abs(x - y) <= rel_tol * max(1.0, abs(y)) or round(x, digits) == y
    return pred_n == ans_n


def top_answers(preds):
    """The most-voted answers (normalized), each as the indices of its CoTs, in first-seen order:
    several lists when the vote is tied."""
    keys = [normalize(p) for p in preds]
    counts = Counter(keys)                                       # insertion order: first seen first
    best = max(counts.values())
    return [[i for i, k in enumerate(keys) if k == answer] for answer, n in counts.items() if n == best]


def uniform_choice(correct, groups):
    """Expected accuracy of a uniform choice among tied candidates: each group (a tied answer, or a
    tied CoT) is equally likely and scores the mean correctness of its CoTs."""
    return sum(sum(correct[i] for i in g) / len(g) for g in groups) / len(groups)


# ==============================================================================================
# 4. Records: our fields, validation and keys
# ==============================================================================================

# Required fields per record kind and their types.
_FIELDS = {
    "question": {"id": (str, int), "question": str},
    "keyed": {"domain": str, "answer": (str, int, float)},
    "steps": {"steps": list},
    "correct": {"correct": bool},
    "labels": {"mc": list},
}


# What each kind of record needs: questions (gen_cots), CoTs with correctness (meta), labelled CoTs
# (training), and test CoTs to score, whose domain, answer and correctness may be unknown.
_KINDS = {"questions": ("question", "keyed"), "cots": ("question", "keyed", "steps", "correct"),
          "labels": ("question", "keyed", "steps", "labels"), "test": ("question", "steps")}


def check_record(obj, kind, file, line, image_root, outside_images=False):
    """Validate one record of a given kind ('questions', 'cots', 'labels', 'test') in place.

    Every format's reader ends here. Adds '_image' (absolute image path or None), '_question' (the
    user-turn text) and '_src' (file, line). Raises DataError naming file, line and field.
    """
    for k in _KINDS[kind]:
        for field, typ in _FIELDS[k].items():
            if field not in obj:
                raise DataError("missing required field", file, line, field)
            if not isinstance(obj[field], typ) or (typ is not bool and isinstance(obj[field], bool)):
                raise DataError(f"wrong type {type(obj[field]).__name__}", file, line, field)
    if obj.get("correct") is not None and not isinstance(obj["correct"], bool):
        raise DataError(f"wrong type {type(obj['correct']).__name__} (true, false or absent)", file, line, "correct")
    for field, types, what in (("final", str, "a string or null"), ("pred", str, "a string or null"),
                               ("toy", dict, "an object or absent"), ("policy", str, "a string or null")):
        if obj.get(field) is not None and not isinstance(obj[field], types):
            raise DataError(f"wrong type {type(obj[field]).__name__} ({what})", file, line, field)
    if kind != "questions" and "sample" in obj and (type(obj["sample"]) is not int or obj["sample"] < 0):
        raise DataError(f"{obj['sample']!r} is not a sample number (an integer >= 0)", file, line, "sample")
    if kind == "test":
        obj.setdefault("domain", "all")
        obj.setdefault("answer", "")
        if not isinstance(obj["domain"], str):
            raise DataError(f"wrong type {type(obj['domain']).__name__}", file, line, "domain")
    obj["id"] = str(obj["id"])
    obj["domain"] = obj["domain"].strip()
    obj["answer"] = str(obj["answer"])
    if not obj["question"].strip():
        raise DataError("empty question", file, line, "question")
    choices = obj.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise DataError("must be a list of strings", file, line, "choices")
    image = obj.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise DataError("must be a path or null", file, line, "image")
        path = os.path.abspath(image if os.path.isabs(image) else os.path.join(image_root, image))
        if not outside_images and not _inside(path, image_root):
            raise DataError(f"{image!r} leads outside the image root {image_root} (after links); "
                            "--allow-outside-images reads it anyway", file, line, "image")
        problem = _check_image(path)
        if problem:
            raise DataError(problem, file, line, "image")
        obj["_image"] = path
    else:
        obj["_image"] = None
    if kind != "questions":
        steps = obj["steps"]
        if not all(isinstance(s, str) for s in steps):
            raise DataError("must be a list of strings", file, line, "steps")
        if any(not s.strip() for s in steps):
            raise DataError("empty step", file, line, "steps")
    if kind == "labels" or (kind == "test" and obj.get("mc") is not None):
        check_labels(obj["mc"], len(obj["steps"]), file, line)
    obj["_question"] = question_text(obj)
    obj["_src"] = (file, line)
    return obj


def check_labels(mc, n_steps, file=None, line=None, field="mc"):
    """MC labels: one per step, each a number in [0, 1] (None: that step is unlabelled)."""
    if len(mc) != n_steps:
        raise DataError(f"{len(mc)} labels for {n_steps} steps", file, line, field)
    for p in mc:
        if p is None:
            continue
        if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not 0.0 <= p <= 1.0:
            raise DataError(f"label {p!r} is not a number in [0, 1]", file, line, field)


def _inside(path, root):
    """Whether a path, after its links, lies inside the root folder (after its links)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, top]) == top


@lru_cache(maxsize=4096)
def _check_image(path):
    """None if path is an image that decodes whole (only such files are read or sent on), else
    what is wrong with it. An aspect ratio over 200 is refused: the image processor cannot resize it."""
    if not os.path.isfile(path):
        return f"no such image file: {path}"
    try:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
    except Exception:
        return f"not an image (it does not decode): {path}"
    if max(w, h) > 200 * min(w, h):
        return f"aspect ratio over 200 ({w}x{h}): {path}"
    return None


@lru_cache(maxsize=65536)
def image_digest(path):
    """SHA-1 of an image file's bytes: the same picture under two paths is the same image."""
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def question_key(r):
    """What makes two records the same question: the question text (whitespace collapsed) and the
    image's content (not its path); text-only questions compare text alone."""
    image = r.get("_image")
    return " ".join(r["_question"].split()), image_digest(image) if image else None


def _content_key(r):
    """A record key from content, for formats without sample numbers: the question text, image
    content and step texts (and the question id where the source gives one)."""
    h = hashlib.sha1(json.dumps([r["id"] if r.get("_given_id") else None, *question_key(r), r["steps"]]).encode())
    return "sha1:" + h.hexdigest()[:16]


def record_key(r):
    """The key that names one record in every format: 'domain/id#sample' for ours,
    a hash of the question text, image content and step texts for the others."""
    return r["_key"]


def check_unique(records, key=record_key, what="question id and sample", seen=None):
    """A DataError at the first record whose key repeats an earlier record's (in any file).
    `seen` ({key: (file, line)}) carries the keys of earlier calls, for readers that stream."""
    seen = {} if seen is None else seen
    for r in records:
        k = key(r)
        if k in seen:
            f0, l0 = seen[k]
            raise DataError(f"duplicate record: the same {what} {k!r} as {f0}:{l0}", *r["_src"])
        seen[k] = r["_src"]


def _short_id(*parts):
    """A question id for formats that have none: a hash of the question text and image path."""
    return hashlib.sha1("\0".join(str(p) for p in parts).encode()).hexdigest()[:12]


# ==============================================================================================
# 5. The public formats: each one small converter into our records, then one reader
# ==============================================================================================

# A converter takes (source record, file, where, opts) and returns our record (question, answer,
# image, steps, final, pred, correct, mc, domain, id) or a Skip. Step labels become MC values in
# [0, 1]: correct 1.0, wrong 0.0, a neutral or unrated step None (unlabelled: it teaches nothing,
# rather than being read as right or wrong). `correct` is the CoT's final correctness where the
# format states it, else None (unknown) unless opts["correct_from"] is "last-label".

@dataclass
class Skip:
    """A source record left out (with why), and the question and domain it belonged to."""
    reason: str
    question: str
    domain: str = ""


class Skips(list):
    """The Skips of one file, and `read`: how many source records (lines, or list entries) it held."""
    read = 0


ANSWER = (str, int, float)          # an answer key: text or a number


def _need(obj, field, types, file, where):
    """obj[field], present and of one of the types (a bool is not a number)."""
    if not isinstance(obj, dict):
        raise DataError(f"must be an object, found {type(obj).__name__}", file, where, field.rsplit(".", 1)[0])
    if field.split(".")[-1] not in obj:
        raise DataError("missing required field", file, where, field)
    v = obj[field.split(".")[-1]]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        raise DataError(f"wrong type {type(v).__name__}" if v is not None else "null where a value is required",
                        file, where, field)
    return v


def _opt(obj, field, types, file, where, default=None):
    """obj[field] where it is present and not null, checked like _need; else `default`."""
    v = obj.get(field.split(".")[-1]) if isinstance(obj, dict) else None
    return default if v is None else _need(obj, field, types, file, where)


def _strict_bool(v, file, where, field):
    """true/false, or the strings "true"/"false" in any case; anything else is an error."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise DataError(f"{v!r} is not a boolean", file, where, field)


def _label(x, file, where, field):
    """A step label as an MC value: true/false -> 1.0/0.0, a number in [0, 1] as it is."""
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 1:
        return float(x)
    raise DataError(f"label {x!r} is not true, false or a number in [0, 1]", file, where, field)


def _last_label(mc, opts):
    """Correctness for formats that state none: unknown, or the last step's label >= 0.5 when the
    user asks for that rule (--correct-from last-label)."""
    if opts["correct_from"] != "last-label" or not mc or mc[-1] is None:
        return None
    return mc[-1] >= 0.5


def _one_image(v, file, where, field):
    """(image path or None, skip reason or None): records with several images are skipped."""
    if isinstance(v, list):
        if not all(isinstance(x, (str, dict)) for x in v):
            raise DataError("must be an image path, a list of paths or null", file, where, field)
        if len(v) > 1:
            return None, "several images"
        v = v[0] if v else None
    if isinstance(v, dict):                                     # a datasets Image feature exported to JSON
        v = v.get("path")
    if v is not None and not isinstance(v, str):
        raise DataError("must be an image path, a list of paths or null", file, where, field)
    return v or None, None


def _strip_steps(steps, file, where, field):
    """Steps as stripped strings (a non-string step is an error)."""
    if not all(isinstance(s, str) for s in steps):
        raise DataError("must be a list of strings", file, where, field)
    return [s.strip() for s in steps]


def _cot(question, steps, mc, correct, image=None, answer="", domain="", policy="", qid=None, final=""):
    """Our record from a converter's parts; pred by extract_answer, id from the question if none."""
    return dict(id=str(qid) if qid is not None else _short_id(question, image), domain=domain, question=question,
                answer=str(answer), image=image, steps=steps, final=final,
                pred=extract_answer(FINAL_PREFIX + final if final else steps[-1] if steps else ""),
                correct=correct, mc=mc, policy=policy, _given_id=qid is not None)


def _from_ours(obj, file, where, opts):
    return obj


def _question_of(preamble):
    """The question in a published DreamPRM input's text before Step 1: up to the paragraph with
    its 'Options:' line; without options, the response's opening sentence ("Let's analyze the
    question step by step:"), a last one-line paragraph that speaks of steps, is left out."""
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", preamble.strip()) if p.strip()]
    with_options = [i for i, p in enumerate(paragraphs) if re.search(r"^[ \t]*Options[ \t]*:", p, re.MULTILINE)]
    if with_options:
        return "\n\n".join(paragraphs[:with_options[-1] + 1])
    last = paragraphs[-1] if paragraphs else ""
    if len(paragraphs) > 1 and "\n" not in last and re.search(r"\bstep|^let", last, re.IGNORECASE):
        paragraphs = paragraphs[:-1]
    return "\n\n".join(paragraphs)


def _from_dreamprm(obj, file, where, opts):
    """Published DreamPRM JSON. Meta record {id?, true_false, input, image_path}: one CoT, question
    and steps inside input. Train record {id?, sid?, input, add, image_path, dataset, accuracy}:
    one step prefix (grouped into CoTs afterwards, `_group_prefixes`); a prefix without step
    markers is one labelled step, as the published code trains on it."""
    text = _need(obj, "input", str, file, where)
    image, several = _one_image(obj.get("image_path"), file, where, "image_path")
    if "true_false" in obj:
        split = split_steps(text, paragraphs=False)
        question, steps, mc = _question_of(split.preamble), split.steps, None
        correct = _strict_bool(obj["true_false"], file, where, "true_false")
        domain, answer = _opt(obj, "dataset", str, file, where) or opts["domain"] or "meta", ""
    else:
        acc = _label(_need(obj, "accuracy", (int, float), file, where), file, where, "accuracy")
        split = split_steps(_need(obj, "add", str, file, where), paragraphs=False)
        question, steps = text, split.steps or ([split.preamble] if split.preamble else [])
        mc, correct = [None] * (len(steps) - 1) + [acc], acc >= 0.5
        domain, answer = _need(obj, "dataset", str, file, where), _opt(obj, "ground_truth", ANSWER, file, where, "")
    qid = _opt(obj, "id", (str, int), file, where)
    rec = _cot(question, steps, mc, correct, image, answer, domain,
               qid=qid if qid is not None else _short_id(question, obj.get("image_path")), final=split.final)
    rec["_given_id"] = qid is not None
    if mc is None:
        del rec["mc"]
    else:
        rec["_prefix"] = True
    if several or not steps:
        return Skip(several or "no steps", rec["id"], rec["domain"])
    return rec


def _text_of(prompt, file, where, field="prompt"):
    """A prompt as text: a string, or chat messages {role, content} whose content is a string or a
    list of parts ({type: text, text} joined; image parts carry no text)."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        raise DataError("must be a string or a list of chat messages", file, where, field)
    texts = [_content_text(_need(m, f"{field}[{k}].content", (str, list), file, where), file, where,
                           f"{field}[{k}].content") for k, m in enumerate(prompt)]
    return "\n".join(t for t in texts if t)


def _content_text(content, file, where, field):
    """A chat message's content as text: a string, or its parts' texts joined (image parts add none)."""
    if isinstance(content, str):
        return content
    for j, x in enumerate(content):
        if not isinstance(x, dict) or not isinstance(x.get("text", ""), str):
            raise DataError("a content part must be an object whose text is a string", file, where, f"{field}[{j}]")
    return "\n".join(x.get("text", "") for x in content if x.get("text"))


def _from_trl(obj, file, where, opts):
    """TRL stepwise supervision {prompt, completions: [str], labels: [bool or number in [0, 1]],
    image(s)?, domain?}: each completion is a step, each label its correctness. TRL states no
    final correctness (a record may be an unfinished prefix), so it is unknown (--correct-from)."""
    question = _text_of(_need(obj, "prompt", (str, list), file, where), file, where)
    steps = _strip_steps(_need(obj, "completions", list, file, where), file, where, "completions")
    labels = _need(obj, "labels", list, file, where)
    if len(labels) != len(steps):
        raise DataError(f"{len(labels)} labels for {len(steps)} completions", file, where, "labels")
    mc = [_label(x, file, where, "labels") for x in labels]
    field = "images" if "images" in obj else "image"
    image, several = _one_image(obj.get(field), file, where, field)
    rec = _cot(question, steps, mc, _last_label(mc, opts), image, _opt(obj, "answer", ANSWER, file, where, ""),
               _opt(obj, "domain", str, file, where) or opts["domain"])
    return _skip_or(rec, several)


def _from_visualprocessbench(obj, file, where, opts):
    """VisualProcessBench {image: [paths], question, answer, response: {steps, process_correctness},
    policy_model, data_source}. Labels 1 (correct) -> 1.0, -1 (incorrect) -> 0.0, 0 (neutral) ->
    unlabelled; the CoT is correct when no step is incorrect."""
    question = _need(obj, "question", str, file, where)
    response = _need(obj, "response", (dict, str), file, where)
    if isinstance(response, str):                              # some exports keep it as JSON text
        try:
            response = json.loads(response)
        except json.JSONDecodeError:
            raise DataError("not a JSON object with steps and process_correctness", file, where, "response") from None
    steps = _strip_steps(_need(response, "response.steps", list, file, where), file, where, "response.steps")
    labels = _need(response, "response.process_correctness", list, file, where)
    if len(labels) != len(steps) or any(x not in (1, 0, -1) or isinstance(x, bool) for x in labels):
        raise DataError(f"needs one of 1, 0, -1 for each of the {len(steps)} steps", file, where,
                        "response.process_correctness")
    image, several = _one_image(obj.get("image"), file, where, "image")
    rec = _cot(question, steps, [{1: 1.0, -1: 0.0, 0: None}[x] for x in labels], -1 not in labels, image,
               _need(obj, "answer", ANSWER, file, where), _opt(obj, "data_source", str, file, where) or opts["domain"],
               _opt(obj, "policy_model", str, file, where, ""))
    return _skip_or(rec, several)


def _from_prm800k(obj, file, where, opts):
    """PRM800K (openai/prm800k, one labelled solution per line): question {problem,
    ground_truth_answer}, label {steps: [{completions: [{text, rating}], chosen_completion,
    human_completion}], finish_reason}. The CoT follows the chosen completion of each step (or the
    labeler's own, rated +1); where none was chosen it ends, with the completion rated -1 that
    ended the labelling if there is one. Ratings +1 -> 1.0, -1 -> 0.0, 0 (neutral) -> unlabelled.
    Correct when finish_reason is 'solution', wrong when 'found_error'; 'give_up' and
    'bad_problem' records have no outcome and are skipped."""
    q, label = _need(obj, "question", dict, file, where), _need(obj, "label", dict, file, where)
    problem = _need(q, "question.problem", str, file, where)
    finish = _need(label, "label.finish_reason", str, file, where)
    if finish not in PRM800K_FINISH:
        raise DataError(f"{finish!r} is not one of {', '.join(PRM800K_FINISH)}", file, where, "label.finish_reason")
    steps, mc = [], []
    for k, step in enumerate(_need(label, "label.steps", list, file, where)):
        field = f"label.steps[{k}]"
        if not isinstance(step, dict):
            raise DataError(f"must be an object, found {type(step).__name__}", file, where, field)
        completions = _prm800k_completions(step, file, where, field)
        chosen = _opt(step, f"{field}.chosen_completion", int, file, where)
        human = _opt(step, f"{field}.human_completion", (dict, str), file, where)
        if chosen is not None:
            if not 0 <= chosen < len(completions):
                raise DataError(f"chosen_completion {chosen!r} is not an index of completions", file, where, field)
            c = completions[chosen]
        elif human is not None:
            c = {"text": _need(human, f"{field}.human_completion.text", str, file, where) if isinstance(human, dict)
                 else human, "rating": 1}
        else:
            c = next((x for x in completions if x.get("rating") == -1), None)
        if c is None:
            break
        steps.append(c["text"].strip())
        mc.append({1: 1.0, -1: 0.0}.get(c.get("rating")))
        if chosen is None and human is None:
            break
    rec = _cot(problem, steps, mc, {"solution": True, "found_error": False}.get(finish), None,
               _opt(q, "question.ground_truth_answer", ANSWER, file, where, ""), opts["domain"])
    if finish not in ("solution", "found_error"):
        return Skip(f"finish_reason {finish}: no outcome", rec["id"], rec["domain"])
    return _skip_or(rec, None)


PRM800K_FINISH = ("solution", "found_error", "give_up", "bad_problem")


def _prm800k_completions(step, file, where, field):
    """A PRM800K step's completions, each {text: str, rating: -1, 0, 1 or null}."""
    completions = _need(step, f"{field}.completions", list, file, where)
    for j, c in enumerate(completions):
        _need(c, f"{field}.completions[{j}].text", str, file, where)
        rating = c.get("rating")
        if rating is not None and (type(rating) is not int or rating not in (-1, 0, 1)):
            raise DataError(f"rating {rating!r} is not -1, 0, 1 or null", file, where, f"{field}.completions[{j}].rating")
    return completions


MATH_SHEPHERD_TAG = "ки"                     # Math-Shepherd marks the end of each step with this tag
_FIRST_STEP_RE = re.compile(r"(?:#+[ \t]*)?(?:\*\*)?\bStep[ \t]*1\b", re.IGNORECASE)   # inline: "... ? Step 1: ..."


def _from_mathshepherd(obj, file, where, opts):
    """Math-Shepherd {input: the question and steps, each step followed by 'ки'; label: the same
    text with '+' or '-' in place of each tag; task}. '+' -> 1.0, '-' -> 0.0 (its MC labels, hard
    estimate). The question is the text before 'Step 1'; the last step gives the answer ('The
    answer is: ...'), and its label is that answer's correctness. A record without a 'Step 1'
    marker, or with a tag before it (a label inside the question), cannot be split faithfully: it
    is skipped with its reason. The label text must be the input's, sign for tag: a label line of
    another record is an error."""
    text, marked = _need(obj, "input", str, file, where), _need(obj, "label", str, file, where)
    domain = _opt(obj, "task", str, file, where) or opts["domain"]
    pieces = text.split(MATH_SHEPHERD_TAG)
    mc, at = [], 0
    for k, piece in enumerate(pieces):                          # the tag k stands after piece k in `marked`
        if marked[at:at + len(piece)] != piece:
            differ = at + next((i for i, (x, y) in enumerate(zip(piece, marked[at:])) if x != y),
                               min(len(piece), len(marked) - at))
            raise DataError(f"its text differs from input's at character {differ + 1} (the label of another "
                            "record?)", file, where, "label")
        at += len(piece)
        if k == len(pieces) - 1:
            break
        sign = marked[at:at + 1]
        if sign not in ("+", "-"):
            raise DataError(f"no '+' or '-' where input has its tag {len(mc) + 1}", file, where, "label")
        mc.append(1.0 if sign == "+" else 0.0)
        at += 1
    if at != len(marked):
        raise DataError(f"it goes on past input's end (character {at + 1}; the label of another record?)",
                        file, where, "label")
    first = _FIRST_STEP_RE.search(pieces[0])
    if first is None and mc:
        where_marker = next((k for k, p in enumerate(pieces) if _FIRST_STEP_RE.search(p)), None)
        why = "a step tag inside the question (before 'Step 1')" if where_marker else \
            "no 'Step 1' marker (the question cannot be told from the first step)"
        return Skip(why, _short_id(text), domain)
    question = pieces[0][:first.start()].strip() if first else text.strip()
    steps = [pieces[0][first.start():].strip()] + [p.strip() for p in pieces[1:-1]] if mc else []
    rec = _cot(question, steps, mc, mc[-1] == 1.0 if mc else None, domain=domain)
    return _skip_or(rec, None)


def _from_processbench(obj, file, where, opts):
    """ProcessBench {id, generator, problem, steps, final_answer_correct, label}: label is the index
    of the first wrong step, or -1 when every step is right. Steps before it -> 1.0, that step ->
    0.0, later steps unlabelled (no one judged them); correct = final_answer_correct. The domain is
    the record's subset (gsm8k, math, olympiadbench, omnimath: _processbench_subset), else the file's."""
    problem = _need(obj, "problem", str, file, where)
    steps = _strip_steps(_need(obj, "steps", list, file, where), file, where, "steps")
    first_wrong = _need(obj, "label", int, file, where)
    if not -1 <= first_wrong < len(steps):
        raise DataError(f"{first_wrong} is not -1 or a step index below {len(steps)}", file, where, "label")
    n = len(steps) if first_wrong < 0 else first_wrong
    mc = [1.0] * n + ([0.0] + [None] * (len(steps) - n - 1) if first_wrong >= 0 else [])
    correct = _strict_bool(_need(obj, "final_answer_correct", (bool, str), file, where), file, where,
                           "final_answer_correct")
    rec = _cot(problem, steps, mc, correct, domain=_processbench_subset(obj, file, where) or opts["domain"],
               policy=_opt(obj, "generator", str, file, where, ""), qid=_opt(obj, "id", (str, int), file, where))
    rec["_first_wrong"] = first_wrong
    return _skip_or(rec, None)


def _processbench_subset(obj, file, where):
    """The ProcessBench subset a record names: a 'subset' or 'split' field, else the prefix of its
    own id ('gsm8k-0' -> 'gsm8k'); None when neither says (the file then names it)."""
    for field in ("subset", "split"):
        name = _opt(obj, field, str, file, where, "").strip()
        if name:
            return name
    m = re.fullmatch(r"([A-Za-z][\w.]*)-\d+", str(_opt(obj, "id", (str, int), file, where, "")))
    return m.group(1) if m else None


def _turns(conversations, file, where):
    """Chat turns as (role, text), role 'user' or 'assistant' (system turns dropped): InternVL's
    {from: human/gpt, value} or {role: user/assistant, content}. A Python-literal string of the
    list (as the DreamPRM-1.5 meta set stores it) is parsed as a literal, never evaluated."""
    if isinstance(conversations, str):
        try:
            conversations = ast.literal_eval(conversations)
        except (ValueError, SyntaxError):
            raise DataError("not a list of turns", file, where, "conversations") from None
    if not isinstance(conversations, list):
        raise DataError("must be a list of turns", file, where, "conversations")
    turns = []
    for k, t in enumerate(conversations):
        role = t.get("from", t.get("role")) if isinstance(t, dict) else None
        role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}.get(role, role)
        if role not in ("user", "assistant", "system") or not ("value" in t or "content" in t):
            raise DataError("a turn needs from/value (human, gpt) or role/content (user, assistant)", file, where,
                            f"conversations[{k}]")
        key = "value" if "value" in t else "content"
        text = _content_text(_need(t, f"conversations[{k}].{key}", (str, list), file, where), file, where,
                             f"conversations[{k}].{key}")
        if role != "system":
            turns.append((role, text))
    return turns


def _conversation(conversations, file, where):
    """(question, steps, mc) of a step-by-step supervision chat: a user turn answered by '+' or '-'
    is a step (+ -> 1.0, - -> 0.0); user turns before the first step are the question. Where the
    first step's turn holds the question too ('### Question: ... ### Solution Process: step', or
    'question Step 1: ...'), it is split there."""
    turns, question, steps, mc = _turns(conversations, file, where), [], [], []
    for k, (role, text) in enumerate(turns):
        answer = turns[k + 1][1].strip() if k + 1 < len(turns) and turns[k + 1][0] == "assistant" else None
        if role == "assistant":
            if text.strip() not in ("+", "-") or k == 0 or turns[k - 1][0] != "user":
                raise DataError(f"assistant turn {text.strip()[:20]!r}: only '+' or '-' after a step", file, where,
                                "conversations")
        elif answer in ("+", "-"):
            steps.append(text)
            mc.append(1.0 if answer == "+" else 0.0)
        elif not steps:
            question.append(text)
        else:
            raise DataError("a step without a '+' or '-' answer", file, where, "conversations")
    if not question and steps:
        split = re.search(r"^[ \t]*#*[ \t]*Solution Process[ \t]*:?[ \t]*$", steps[0], re.MULTILINE | re.IGNORECASE) \
            or _FIRST_STEP_RE.search(steps[0])
        if split is None or split.start() == 0:
            raise DataError("the first step's turn holds no question ('### Solution Process:' or 'Step 1' "
                            "marker not found)", file, where, "conversations")
        cut = split.end() if "solution process" in split.group(0).lower() else split.start()
        question, steps[0] = [steps[0][:split.start()]], steps[0][cut:]
    question = re.sub(r"<image>|^[ \t]*#*[ \t]*Question[ \t]*:[ \t]*\n", "", "\n".join(question),
                      flags=re.MULTILINE | re.IGNORECASE).strip()
    return question, [s.strip() for s in steps], mc


def _from_dreamprm15(obj, file, where, opts):
    """DreamPRM-1.5 meta set {id, response, true_false, image, conversations}: the question turn,
    then each step as a turn answered '+' (the published file answers every step '+', whatever the
    outcome, so those answers are not read as labels); correct = true_false (a bool or the string
    'True'/'False')."""
    question, steps, _ = _conversation(_need(obj, "conversations", (list, str), file, where), file, where)
    image, several = _one_image(obj.get("image"), file, where, "image")
    correct = _strict_bool(_need(obj, "true_false", (bool, str), file, where), file, where, "true_false")
    rec = _cot(question, steps, None, correct, image, domain=_opt(obj, "dataset", str, file, where) or opts["domain"],
               qid=_opt(obj, "id", (str, int), file, where))
    del rec["mc"]
    return _skip_or(rec, several)


def _from_visualprm400k(obj, file, where, opts):
    """VisualPRM400K. v1.1 (raw): {image, question, answer, response, steps_with_score: [{step,
    score}]}, each score the step's MC value. v1.0: {image, conversations}, the question and first
    step in one turn, each step answered '+' or '-' (its release wrote '+' wherever the MC score is
    above 0). Both read as one quantity: 1.0 where the step's MC score is above 0, else 0.0; the
    '<image>' placeholder never enters the question. No final correctness is stated (--correct-from)."""
    image, several = _one_image(obj.get("image"), file, where, "image")
    if "steps_with_score" not in obj and "conversations" not in obj:
        raise DataError("missing required field (v1.1 records have steps_with_score, v1.0 conversations)",
                        file, where, "steps_with_score")
    if "steps_with_score" in obj:
        scored = _need(obj, "steps_with_score", list, file, where)
        steps = [_need(s, f"steps_with_score[{k}].step", str, file, where).strip() for k, s in enumerate(scored)]
        # v1.0 is v1.1 post-processed ('+' wherever the MC score is above 0): the same quantity from both.
        mc = [float(_label(_need(s, f"steps_with_score[{k}].score", (int, float), file, where), file, where,
                           f"steps_with_score[{k}].score") > 0) for k, s in enumerate(scored)]
        question = re.sub(r"<image>", "", _need(obj, "question", str, file, where)).strip()   # not question text
    else:
        question, steps, mc = _conversation(_need(obj, "conversations", (list, str), file, where), file, where)
    rec = _cot(question, steps, mc, _last_label(mc, opts), image, _opt(obj, "answer", ANSWER, file, where, ""),
               _opt(obj, "source", str, file, where) or opts["domain"])
    return _skip_or(rec, several)


def _from_rlhflow(obj, file, where, opts):
    """RLHFlow PRM data (Mistral-PRM-Data, Deepseek-PRM-Data): {conversations: [{role: user, content:
    the question and step 1}, {role: assistant, content: '+'}, {role: user, content: step 2}, ...]}.
    No final correctness is stated (--correct-from)."""
    question, steps, mc = _conversation(_need(obj, "conversations", (list, str), file, where), file, where)
    return _skip_or(_cot(question, steps, mc, _last_label(mc, opts), domain=opts["domain"]), None)


def _skip_or(rec, several):
    """The record, or why it is skipped: several images, no steps, or an empty step."""
    steps = rec["steps"]
    if several or not steps or any(isinstance(s, str) and not s for s in steps):
        return Skip(several or ("no steps" if not steps else "empty step"), rec["id"], rec["domain"])
    return rec


# name: (converter, the fields that identify it, what a file of this format holds). Detection takes
# the first format whose identifying fields the first record has (in this order: specific first).
FORMATS = {
    "prm800k": (_from_prm800k, ("question.problem", "label.steps"),
                "JSON Lines: question {problem, ground_truth_answer}, label {steps [{completions [{text, rating}], "
                "chosen_completion, human_completion}], finish_reason}"),
    "processbench": (_from_processbench, ("problem", "steps", "label", "final_answer_correct"),
                     "JSON Lines or list: id, generator, problem, steps [str], final_answer_correct, label "
                     "(first wrong step, -1 for none)"),
    "mathshepherd": (_from_mathshepherd, ("input", "label"), "JSON Lines: input (steps each ending in 'ки'), "
                     "label (the same text with + or -), task"),
    "dreamprm15": (_from_dreamprm15, ("conversations", "true_false"),
                   "JSON list: id, response, true_false, image, conversations (question turn, step turns)"),
    "visualprm400k": (_from_visualprm400k, ("image", "steps_with_score|conversations"),
                      "JSON Lines: image, question, answer, steps_with_score [{step, score}] (v1.1); or image, "
                      "conversations of from/value turns answered + or - (v1.0)"),
    "rlhflow": (_from_rlhflow, ("conversations",), "JSON Lines: conversations of role/content turns, each step "
                "a user turn answered + or -"),
    "trl": (_from_trl, ("prompt", "completions", "labels"), "JSON list or JSON Lines: prompt, completions [str], "
            "labels [bool or number in [0, 1]], image or images optional, domain optional"),
    "dreamprm": (_from_dreamprm, ("input", "add|true_false"), "one JSON list: train records input, add, "
                 "accuracy, dataset, image_path (id, sid optional); meta records input, true_false, image_path"),
    "visualprocessbench": (_from_visualprocessbench, ("question", "response"), "JSON Lines: image [paths], "
                           "question, answer, response {steps, process_correctness}, data_source"),
    "ours": (_from_ours, ("question",), "JSON Lines: id, domain, question, answer, image?, choices?; CoTs add "
             "sample, steps, final, correct; labels add mc"),
}


# -- Reading a file: detect its format, convert, validate --------------------------------------

def _container(path):
    """'list' for a file holding one JSON list, 'lines' for JSON Lines: the one format sniffer's
    first question, answered from the first bytes (a byte-order mark and whitespace skipped)."""
    if not os.path.isfile(path):
        raise DataError("no such file", file=path)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "list" if head.startswith(b"[") else "lines"


def _load_items(path):
    """('list', [(where, object)]) for a JSON list, ('lines', [(line, object)]) for JSON Lines."""
    if _container(path) == "lines":
        return "lines", list(iter_jsonl(path))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 (byte {e.start + 1})", file=path) from None
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at line {e.lineno})", file=path, line=e.lineno) from None
    except RecursionError:
        raise DataError("JSON nested too deeply", file=path) from None
    if not isinstance(data, list):
        raise DataError("one JSON value that is not a list of records", file=path)
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError("each record must be an object", path, f"record {i}")
    return "list", [(f"record {i}", obj) for i, obj in enumerate(data)]


def _has(obj, spec):
    """Whether a record has an identifying field: 'a' (present), 'a.b' (nested) or 'a|b' (either)."""
    if "|" in spec:
        return any(_has(obj, s) for s in spec.split("|"))
    head, _, rest = spec.partition(".")
    return head in obj and (not rest or (isinstance(obj[head], dict) and rest in obj[head]))


def detect_format(container, items, path):
    """The format of a file: the first in FORMATS whose identifying fields its first record has.
    A record that fits none is named against the nearest format and the fields it lacks."""
    if not items:
        return "ours"
    where, first = items[0]
    for name, (_, fields, _) in FORMATS.items():
        if all(_has(first, f) for f in fields):
            return name
    share = {name: sum(_has(first, f) for f in fields) / len(fields) for name, (_, fields, _) in FORMATS.items()}
    nearest = max(share, key=share.get)
    lacks = [f.replace("|", " or ") for f in FORMATS[nearest][1] if not _has(first, f)]
    hint = f"nearest: {nearest}, which needs {', '.join(lacks)}; " if share[nearest] else ""
    raise DataError(f"matches no known format ({hint}formats and their fields: "
                    + "; ".join(f"{name}: {desc}" for name, (_, _, desc) in FORMATS.items()) + ")",
                    file=path, line=where)


def _norm_step(s):
    """A step without heading markup and extra whitespace, for matching prefixes of one CoT."""
    return " ".join(re.sub(r"[#*]+", " ", s).split())


def _group_prefixes(prefixes):
    """Published train records are step prefixes; those of one question that extend one another
    become one CoT whose step i has the label of the prefix ending at step i (others None).
    Headings ("### Step k") are ignored when matching, and a prefix whose slot is already taken
    (two CoTs sharing their first steps) starts or joins another CoT."""
    groups = {}
    for r in prefixes:
        groups.setdefault((r["domain"], r["id"], r["question"], r["image"]), []).append(r)
    cots = []
    for members in groups.values():
        members.sort(key=lambda r: -len(r["steps"]))          # longest prefix first
        group = []
        for r in members:
            n, norm = len(r["steps"]), [_norm_step(s) for s in r["steps"]]
            for cot in group:
                if cot["_norm"][:n] == norm and cot["mc"][n - 1] is None:
                    cot["mc"][n - 1] = r["mc"][-1]
                    break
            else:
                group.append(dict(r, _norm=norm))
        for cot in group:
            del cot["_norm"], cot["_prefix"]
            cot["correct"] = cot["mc"][-1] >= 0.5
        cots += group
    return cots


def read_cots(path, kind, image_root=None, fmt="auto", domain=None, correct_from="stated", outside_images=False):
    """The one reader: any supported file -> (records, skips) in our record format.

    kind: 'questions', 'cots' or 'labels' (what the caller needs: labels need step labels).
    fmt: 'auto' (detected from the file) or a name in FORMATS. domain: for formats whose records
    carry none (default: the file name without extension). Records without steps (and, for other
    formats, with several images or an empty step) are skipped and returned as `Skip`s; every kept
    record is validated by `check_record` (images are checked only for kept records) and gets its
    key (`record_key`). Duplicate keys inside the file are a DataError. correct_from: 'stated'
    (final correctness only where the format states it) or 'last-label' (else the last step's
    label >= 0.5). Image paths must lead inside image_root (default: the file's folder) unless
    outside_images.
    """
    container, items = _load_items(path)
    fmt = _resolve_format(fmt, container, items, path)
    opts = _options(path, domain, correct_from, image_root, outside_images)
    records, skips, prefixes, seen = [], Skips(), [], set()
    skips.read = len(items)
    for where, obj in items:
        if fmt == "dreamprm":                                   # prefix records have no key of their own
            raw = json.dumps(obj, sort_keys=True)
            if raw in seen:
                raise DataError("duplicate record (identical to an earlier one)", path, where)
            seen.add(raw)
        rec = _convert(obj, fmt, path, where, opts)
        if isinstance(rec, Skip):
            skips.append(rec)
        else:
            (prefixes if rec.get("_prefix") else records).append(rec)
    records += _group_prefixes(prefixes)
    samples, repeats = {}, {}
    for rec in records:
        _number(_finish(rec, fmt, kind, opts), fmt, samples, repeats)
    check_unique(records, record_key, _key_words(fmt, kind))
    return records, skips


def _resolve_format(fmt, container, items, path):
    fmt = detect_format(container, items, path) if fmt == "auto" else fmt
    if fmt == "ours" and container == "list":
        raise DataError("a JSON list of records in our format: ours is JSON Lines, one object per line", file=path)
    return fmt


def _options(path, domain, correct_from, image_root=None, outside_images=False):
    """What reading a file needs beyond its records: the default domain (the file name without
    extension), the correctness rule, the image root (default: the file's folder) and whether
    images may lie outside it."""
    return {"domain": domain or os.path.splitext(os.path.basename(path))[0], "correct_from": correct_from,
            "image_root": image_root or os.path.dirname(os.path.abspath(path)), "outside_images": outside_images}


def _convert(obj, fmt, path, where, opts):
    """One source record -> our (not yet validated) record, or a Skip."""
    rec = FORMATS[fmt][0](obj, path, where, opts)
    if fmt == "ours" and rec.get("steps") == []:
        return Skip("no steps", str(rec.get("id")), str(rec.get("domain", "")).strip())
    if not isinstance(rec, Skip):
        rec["_src"] = (path, where)
    return rec


def _finish(rec, fmt, kind, opts):
    """Validate a converted record (`check_record`) and give it its format and key."""
    if kind == "labels" and "mc" not in rec:
        raise DataError("no step labels: training needs them (a meta or test file?)", *rec["_src"], "mc")
    if kind == "cots" and fmt != "ours" and rec.get("correct") is None:
        raise DataError(f"no final correctness: {fmt} records state none (--correct-from last-label takes the "
                        "last step's label, >= 0.5 correct)", *rec["_src"], "correct")
    check_record(rec, kind, *rec["_src"], opts["image_root"], opts["outside_images"])
    rec["_format"] = fmt
    if kind != "questions":
        rec.setdefault("sample", 0)
    rec["_key"] = _content_key(rec) if fmt != "ours" else f"{rec['domain']}/{rec['id']}" + \
        ("" if kind == "questions" else f"#{rec.get('sample', 0)}")
    return rec


def _number(rec, fmt, samples, repeats):
    """Formats without sample numbers: the k-th CoT of a question in file order is its sample k, and
    a CoT identical to an earlier one of the file (the same question, image and steps: N samples
    may agree, as the DreamPRM-1.5 meta set's answer-only CoTs do) gets its repeat in its key."""
    if fmt == "ours":
        return rec
    rec["sample"] = samples[rec["id"]] = samples.get(rec["id"], -1) + 1
    n = repeats[rec["_key"]] = repeats.get(rec["_key"], -1) + 1
    rec["_key"] += f"#{n}" if n else ""
    return rec


def _key_words(fmt, kind):
    return "question, image and steps" if fmt != "ours" else \
        "question id" if kind == "questions" else "question id and sample"


def index_questions(path, kind="test", image_root=None, fmt="auto", domain=None, correct_from="stated",
                    outside_images=False):
    """Group a CoT file by question without holding its records, for scoring large test sets.

    One pass reads every record (validated, keys checked for duplicates) and keeps only where it
    is; `load(entries)` then reads one question's records back. Returns (questions, skips, load)
    with questions = [((domain, id), entries)] in first-seen order, whatever the file order. JSON
    lists (json has no streaming reader) and published DreamPRM files (prefixes are grouped across
    the file) are read whole.
    """
    container, groups = _container(path), {}
    if container == "lines":
        with open(path, "rb") as f:
            first = next(((i, o) for i, o in ((i, parse_line(raw, path, i)) for i, raw in enumerate(f, 1))
                          if o is not None), None)
        fmt = _resolve_format(fmt, "lines", [first] if first else [], path)
    if container == "list" or fmt == "dreamprm":
        records, skips = read_cots(path, kind, image_root, fmt, domain, correct_from, outside_images)
        for r in records:
            groups.setdefault((r["domain"], r["id"]), []).append(r)
        return list(groups.items()), skips, lambda entries: entries
    opts = _options(path, domain, correct_from, image_root, outside_images)
    skips, seen, samples, repeats = Skips(), {}, {}, {}

    def read_back(i, offset, sample, key):
        with open(path, "rb") as f:
            f.seek(offset)
            rec = _finish(_convert(parse_line(f.readline(), path, i), fmt, path, i, opts), fmt, kind, opts)
        rec["sample"], rec["_key"] = sample, key
        return rec

    with open(path, "rb") as f:
        offset = 0
        for i, raw in enumerate(f, 1):
            obj = parse_line(raw, path, i)
            if obj is not None:
                skips.read += 1
                rec = _convert(obj, fmt, path, i, opts)
                if isinstance(rec, Skip):
                    skips.append(rec)
                else:
                    rec = _number(_finish(rec, fmt, kind, opts), fmt, samples, repeats)
                    check_unique([rec], record_key, _key_words(fmt, kind), seen)
                    groups.setdefault((rec["domain"], rec["id"]), []).append((i, offset, rec["sample"], rec["_key"]))
            offset += len(raw)
    return list(groups.items()), skips, lambda entries: [read_back(*e) for e in entries]


def skip_report(skips, questions):
    """'N of M source records skipped (why: count, ...); Q of P questions have no CoT left', or ''.

    skips: the Skips of one file (a reader's second result); questions: the ids of the questions
    that kept a CoT. A source record is a line of JSON Lines or an entry of a JSON list (a published
    DreamPRM step prefix counts as one)."""
    if not skips:
        return ""
    reasons = Counter(s.reason for s in skips)
    kept = set(questions)
    lost = {s.question for s in skips} - kept
    total = len(kept | {s.question for s in skips})
    return (f"{len(skips)} of {max(skips.read, len(skips))} source records skipped ("
            + ", ".join(f"{why}: {n}" for why, n in reasons.most_common()) + f"); {len(lost)} of {total} "
            f"questions have no CoT left")


# ==============================================================================================
# 6. The tiny backbones (tests and the toy world; nothing is downloaded)
# ==============================================================================================

# The toy world's folder: gen_cots.py --toy writes it; every stage run without data reads it.
TOY_DIR = "toy"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


# The toy backbone's chat template: Qwen2-VL's without its default system turn (a user turn with
# an optional image). Not a checkpoint's: tests/tiny_families.py holds the published ones.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Text the tiny tokenizer's BPE merges are learned from: the words of the structured prompt and
# of the toy world, so toy CoTs are a few dozen tokens rather than hundreds of bytes.
_TOKENIZER_CORPUS = """Question: Options: Step 1: Restate the question. Step 2: Gather evidence from the image.
Step 3: Identify any background knowledge needed. Step 4: Reason with the current evidence.
Step 5: Summarize and conclude with all the information. Final answer: the answer is
The image shows a red green blue yellow circle square triangle shapes digits number count sum
add plus minus total how many what is which color of the left right top bottom largest smallest
We need to count compute the result so therefore hence check this carefully I think maybe
guess Hmm wait seems correct wrong answer value equals is are was in on at and or not a an
"""


def _tiny_tokenizer(vocab_size=512, special=SPECIAL_TOKENS, template=CHAT_TEMPLATE, eos="<|im_end|>",
                    pad="<|endoftext|>", bos=None, named=None):
    """A BPE tokenizer learned from _TOKENIZER_CORPUS, with a family's special tokens, its chat
    template, and `named` special tokens (tokenizer attributes its processor reads, e.g. boi_token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, eos_token=eos, pad_token=pad,
                                   model_max_length=32768, **({"bos_token": bos} if bos else {}),
                                   **({"extra_special_tokens": named} if named else {}))


def tiny_backbone(seed=0, hidden_size=64, layers=2, heads=4, vision_depth=1):
    """A small randomly initialised Qwen2-VL (the toy world's backbone), as its
    ForConditionalGeneration class (so it can also generate as a policy), its locally built
    tokenizer and a Pillow image processor. (The tests build the other families' in
    tests/tiny_families.py.)

    Deterministic for a seed. Returns (model, tokenizer, image_processor); save all three with
    save_pretrained into one directory (`save_tiny_backbone`) and load them like any checkpoint.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = _tiny_tokenizer()
    tid = tokenizer.convert_tokens_to_ids
    mrope = _mrope_section(hidden_size // heads)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=4096, bos_token_id=tid("<|endoftext|>"),
                         eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"),
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope)),
        vision_config=dict(depth=vision_depth, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tid("<|endoftext|>")
    model.generation_config.eos_token_id = tid("<|im_end|>")
    # Small images: 56x56 to 112x112 pixels, 4 to 16 image tokens after the 2x2 merge.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return model, tokenizer, image_processor


def _mrope_section(head_dim):
    """M-RoPE's split of head_dim / 2 rotary frequencies over (t, h, w), Qwen's proportions."""
    half = head_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]



def save_tiny_backbone(path, seed=0, build=None, **kwargs):
    """Write tiny_backbone(seed, **kwargs), or build(seed, **kwargs) (a (model, tokenizer, image
    processor) builder: the tests' other families), into `path` once; reused if it is already
    there. Returns path."""
    recover_dir(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    model, tokenizer, image_processor = (build or tiny_backbone)(seed, **kwargs)
    _quiet_transformers()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # A folder of this process's own, renamed into place: two runs that start at once each write
    # their own copy, and the second rename finds the first's (the same bytes) and is dropped.
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path.rstrip("/")) + ".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        readable(tmp)
        os.replace(tmp, path)
    except OSError:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(model, cache_dir="runs/tiny-backbone"):
    """--model argument -> a local directory. 'tiny' means the tiny backbone, written on first use."""
    if model == "tiny":
        return save_tiny_backbone(cache_dir)
    if not os.path.isdir(model):
        raise DataError("no such model directory (weights are never downloaded; give a local "
                        "directory written by save_pretrained, or 'tiny')", file=model)
    return model


# ==============================================================================================
# 7. Plumbing
# A reader of the method can stop here: the shared-prefix cache, errors a user can cause, the
# command line, atomic files, JSON Lines, output locks and the PNG line chart.
# ==============================================================================================

# -- The shared-prefix cache, safe under gradient checkpointing ---------------------------------
#
# A checkpointed layer runs its forward again in backward, cache update included: a plain cache
# would append the prefix (or a continuation) a second time. These two updates give the same keys
# and values however often a layer runs, so transformers may keep the cache in checkpointed layers
# (bilevel_train.enable_checkpointing). shared_prefix_values (section 1) uses them.

def prefix_writer(config):
    """The cache the prompt's forward fills: each layer's keys and values are stored by its first
    update; a replay returns its input, as the first update on the empty layer did."""
    from transformers import DynamicCache
    cache = DynamicCache(config=config)
    update = cache.update

    def write_once(keys, values, layer_idx, *args, **kwargs):
        if layer_idx < len(cache.layers) and cache.layers[layer_idx].is_initialized:
            return keys, values
        return update(keys, values, layer_idx, *args, **kwargs)
    cache.update = write_once
    return cache


def prefix_reader(writer, n):
    """The cache the N continuations attend to: the prompt's keys and values repeated n times, in
    layer objects of its own (the writer keeps its own for replays). An update returns the prefix
    and the new states joined and leaves the layer as it was, so every run of a layer reads the
    same prefix."""
    from transformers import DynamicCache
    cache = copy.copy(writer)
    cache.layers = [copy.copy(layer) for layer in writer.layers]
    cache.batch_repeat_interleave(n)

    def read_only(keys, values, layer_idx, *args, **kwargs):
        layer = cache.layers[layer_idx]
        state = dict(vars(layer))
        try:
            return DynamicCache.update(cache, keys, values, layer_idx, *args, **kwargs)
        finally:
            vars(layer).clear()
            vars(layer).update(state)
    cache.update = read_only
    return cache


# -- Errors and the command line ---------------------------------------------------------------

class DataError(ValueError):
    """Bad input a user can cause. str() is one line: 'file:line: field: what is wrong'."""

    def __init__(self, message, file=None, line=None, field=None):
        self.file, self.line, self.field = file, line, field
        where = ":".join(str(p) for p in (file, line) if p is not None)
        parts = [p for p in (where, f"field '{field}'" if field else None, message) if p]
        super().__init__(": ".join(parts))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the scripts' docstrings as written and shows every flag's default (flags whose
    help already explains a computed default say it themselves)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The scripts' argument parser: --help keeps the docstring and shows defaults, and a bad flag
    is one line on stderr ("error: argument --lr: must be > 0"), exit code 2."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=HelpFormatter, allow_abbrev=False)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def number(kind=int, low=None, high=None, above=False):
    """The one flag check: an argparse type for a finite number of `kind` (int or float) that is
    >= low (> low with above=True) and <= high. NaN and infinities are refused."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (x <= low if above else x < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if above else '>='} {low}")
        if high is not None and x > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high}")
        return x
    return parse


def option(default, help, presets=None, **argparse_kw):
    """A field of a script's options dataclass (one flag): its default, its one-line help, how
    argparse reads it (type, choices, nargs) and `presets`, the defaults other settings give it
    ({"toy": 150, ...}; the script fills an unset flag from the first preset that applies, see
    fill_presets). A default of False makes a switch."""
    meta = dict(help=help, presets=presets or {}, argparse=argparse_kw)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def option_default(f):
    """An option field's default (a fresh list for a list flag)."""
    return f.default_factory() if f.default is MISSING else f.default


def add_options(ap, options):
    """One --help group from an options dataclass, titled by its docstring's first line: a flag
    --name-with-dashes per field, in order. A flag with presets stays None until fill_presets, and
    its help lists every value it can default to."""
    g = ap.add_argument_group(options.__doc__.split("\n")[0].strip())
    for f in fields(options):
        default, help, presets = option_default(f), f.metadata["help"], f.metadata["presets"]
        kw = dict(f.metadata["argparse"], action="store_true") if default is False else f.metadata["argparse"]
        if presets:
            help += " (" + "; ".join([f"default: {default}"] + [f"{k} {v}" for k, v in presets.items()]) + ")"
            default = None
        g.add_argument("--" + f.name.replace("_", "-"), default=default, help=help, **kw)


def fill_presets(args, options, names):
    """Each unset flag of the `options` dataclasses takes its value from the first preset in
    `names` that gives one, else its default."""
    for f in (f for o in options for f in fields(o) if f.metadata["presets"]):
        if getattr(args, f.name) is None:
            presets = f.metadata["presets"]
            setattr(args, f.name, next((presets[n] for n in names if n in presets), option_default(f)))


def check_writable(folder):
    """Create `folder` if needed and prove it takes a file, before any long work starts."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")      # one per process: two may probe at once
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise DataError(f"cannot write here ({e.strerror})", file=folder) from None


@dataclass
class InputFormat:
    """Input files"""
    format: str = option("auto", "input file format (auto: detected from the file; see the README's data section)",
                         choices=["auto"] + list(FORMATS))
    domain: str = option(None, "domain of records whose format carries none (trl without a domain field; default: "
                         "the file name without extension)")
    correct_from: str = option("stated", "a CoT's final correctness: only where the format states it (stated; trl, "
                               "rlhflow and visualprm400k state none, so their CoTs' correctness is unknown), or else "
                               "from the last step's label, >= 0.5 correct (last-label)",
                               choices=("stated", "last-label"))
    allow_outside_images: bool = option(False, "read image paths that lead outside the image root (absolute paths, "
                                        "'../', links); by default a dataset can only name images inside it")


def reading(args):
    """The reading flags of InputFormat (and --image-root where a script has it) as keyword
    arguments of read_cots and index_questions."""
    return dict(image_root=getattr(args, "image_root", None), fmt=args.format, domain=args.domain,
                correct_from=args.correct_from, outside_images=args.allow_outside_images)


OTHERS_WAIT = 20.0       # seconds a process other than 0 waits on a bad input for process 0 to say it


def run_cli(main, argv=None, resume_hint="rerun the same command to resume"):
    """Run a script's main(argv). A DataError, or a file that cannot be read or written, becomes one
    line on stderr and exit code 2; a full disk, a quota or the file-size limit exit code 1 (outputs
    are whole up to the last record, a checkpoint or PRM being written is left as it was: make room
    and `resume_hint`); Ctrl-C exit code 130 with `resume_hint`."""
    try:
        return main(argv) or 0
    except DataError as e:
        # Under torchrun every process meets the same bad input: process 0 says it, and its exit stops the
        # others. Another process waits for that first (left to exit first, it would stop process 0 before
        # its line), and speaks itself only when it met the error alone.
        rank = processes()[0]
        if rank > 0:
            time.sleep(OTHERS_WAIT)
        print(f"error: {e}" if rank == 0 else f"error (process {rank}): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: what was written is kept; {resume_hint}", file=sys.stderr)
        return 130
    except Exception as e:
        limit = write_limit(e)
        if limit is None:
            if isinstance(e, OSError):
                print(f"error: {e.filename or 'a file'}: {e.strerror or e}", file=sys.stderr)
                return 2
            raise
        what, fix = WRITE_LIMITS[limit]
        print(f"error: {what} writing {failed_file(e) or 'an output'}: {fix} and {resume_hint}", file=sys.stderr)
        return 1


def failed_file(e):
    """The file an error names, or the error it happened in handling names: a write cut short
    inside `with open(...)` fails again when the file closes, and that second error names none."""
    while e is not None:
        if getattr(e, "filename", None):
            return e.filename
        e = e.__context__
    return None


# errno -> (what happened, what frees the way): the limits a write can meet, each resumable.
WRITE_LIMITS = {errno.ENOSPC: ("no space left on the device", "free space"),
                errno.EDQUOT: ("disk quota exceeded", "free space"),
                errno.EFBIG: ("the file-size limit reached (ulimit -f)", "raise the limit")}


def write_limit(e):
    """The errno of WRITE_LIMITS an error is (a full disk, a quota, the file-size limit), else None:
    an OSError, or the error of a library that reports the operating system's (safetensors: '... No
    space left on device (os error 28)')."""
    if isinstance(e, OSError):
        return e.errno if e.errno in WRITE_LIMITS else None
    if "No space left on device" in str(e):
        return errno.ENOSPC
    return next((n for n in WRITE_LIMITS if f"(os error {n})" in str(e)), None)


class naming:
    """`with naming(path):` a write error that names no file (a write() call; safetensors' own error
    for a full disk) becomes an OSError naming `path`, so the one line a user sees says which file."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, OSError):
            if exc.filename is None:
                exc.filename = self.path
        elif exc is not None and write_limit(exc):
            code = write_limit(exc)
            raise OSError(code, os.strerror(code), self.path) from None
        return False


def processes():
    """(rank, world size) of this process: torchrun's RANK and WORLD_SIZE, (0, 1) in a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def one_process(script, instead):
    """Stop in one line when a script that runs as one process is started by torchrun with more
    than one: each process would write the whole output."""
    world = processes()[1]
    if world > 1:
        raise DataError(f"{script} runs as one process, not {world} under torchrun (each would write the whole "
                        f"output): {instead}")


def join_processes():
    """Under torchrun (world size > 1): join this process to the run's gloo group, for barriers
    (gloo works beside any device). Returns (rank, world size)."""
    rank, world = processes()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return rank, world


def leave_processes():
    """At the end of a torchrun run: every process waits for the others, then leaves the group (its
    communication threads end before the interpreter does; left to exit they can abort it). The
    sharded PRM that holds the group, kept alive by FSDP2's reference cycles, is freed first."""
    if torch.distributed.is_initialized():
        barrier()
        gc.collect()
        torch.distributed.destroy_process_group()


def exit_process(code):
    """sys.exit(code) for a script's last line. Under torchrun the process ends without the
    interpreter's teardown, in which a gloo group's threads can still abort a process whose work is
    done and written ('terminate called without an active exception', exit -6: seen twice in this
    project's 2-process tests); its output is flushed first."""
    if processes()[1] > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def barrier():
    """Wait for every process of a torchrun run (nothing in a plain run)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def pick_device(name):
    """--device: 'auto' is cuda when a GPU is present, else cpu; anything else is taken as given,
    checked to exist here. Under torchrun with more than one process, each process takes the GPU of
    its LOCAL_RANK (two on one GPU would only contend for it)."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise DataError(f"unknown device {name!r} (auto, cpu, cuda, cuda:1, ...)", field="--device") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise DataError(f"{name}: no such CUDA device on this machine", field="--device")
    if device.type not in ("cpu", "cuda", "mps") or (device.type == "mps" and not torch.backends.mps.is_available()):
        raise DataError(f"{name}: not available here (auto, cpu, cuda)", field="--device")
    if device.type == "cuda" and processes()[1] > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device.index is not None:
            raise DataError(f"{name}: under torchrun each process takes the GPU of its LOCAL_RANK; give --device "
                            "cuda (CUDA_VISIBLE_DEVICES picks which GPUs)", field="--device")
        if local >= torch.cuda.device_count():
            raise DataError(f"torchrun started more processes on this machine than it has GPUs "
                            f"({torch.cuda.device_count()})", field="--nproc-per-node")
        device = torch.device("cuda", local)
    return device


# -- Progress: a bar on a terminal, a few plain lines in a log --------------------------------

PROGRESS_EVERY = 30.0           # seconds between two progress lines when stderr is not a terminal


def progress(iterable=None, total=None, initial=0, desc="", unit="it", leave=True):
    """A progress bar over `iterable` (or updated by hand): tqdm on a terminal. Off one (a log file,
    a batch job) every refresh of a bar would land in the log, so there it is ProgressLines: one
    plain line with the bar's figures every PROGRESS_EVERY seconds, and one at the end."""
    if sys.stderr.isatty() or processes()[0] > 0:          # under torchrun, process 0's bar alone
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                    disable=processes()[0] > 0)
    return ProgressLines(iterable, total, initial, desc, unit, leave)


class ProgressLines:
    """What tqdm shows, as a line on stderr at a steady pace: 'desc: n/total unit (p%), s elapsed,
    rate unit/s, about s left[, postfix]'. The parts of tqdm's interface the scripts use."""

    def __init__(self, iterable=None, total=None, initial=0, desc="", unit="it", leave=True):
        self.iterable, self.desc, self.unit, self.leave, self.postfix = iterable, desc, unit, leave, ""
        self.total = total if total is not None or iterable is None else initial + len(iterable)
        self.n = self.start_n = initial
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, k=1):
        self.n += k
        if time.monotonic() - self.last >= PROGRESS_EVERY:
            self.line()

    def set_postfix_str(self, text):
        self.postfix = text

    def line(self):
        self.last = time.monotonic()
        seconds = self.last - self.t0
        rate = (self.n - self.start_n) / seconds if seconds > 0 else 0.0
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n} {self.unit}"
        left = f", about {(self.total - self.n) / rate:.0f} s left" if self.total and rate > 0 and self.n < self.total \
            else ""
        print(f"{self.desc}: {done}, {seconds:.0f} s, {rate_text(rate)} {self.unit}/s{left}"
              + (f", {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

    def close(self):
        if not self.closed and self.leave:
            self.line()
        self.closed = True


def rate_text(x):
    """A rate with the digits that show it: 1234 -> '1234', 3.456 -> '3.5', 0.1512 -> '0.15'."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


# -- Files: atomic writes, JSON Lines, one writer per output -----------------------------------

class atomic_dir:
    """`with atomic_dir(path) as tmp:` write into tmp; on success tmp replaces path.

    The replacement is two renames (path -> path.old, tmp -> path); a crash between them leaves
    no `path` but a complete `path.old`, which `recover_dir` puts back.
    """

    def __init__(self, path):
        self.path = path.rstrip("/")
        self.tmp = self.path + ".tmp"

    def __enter__(self):
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = self.path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(self.path):
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)
        return False


def readable(folder):
    """Files of a written directory readable by others (0644 less the umask), as a shared model is."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def recover_dir(path):
    """Undo a replacement cut short by a crash (see atomic_dir): bring path.old back. Returns path."""
    path = path.rstrip("/")
    if not os.path.exists(path) and os.path.isdir(path + ".old"):
        os.replace(path + ".old", path)
    return path


def read_json_object(path, hint=""):
    """A JSON object from a file this code wrote (prm.json, a run's config and state); missing, not
    JSON or not an object is one DataError, with `hint` (what that means for the caller) after it."""
    tail = f": {hint}" if hint else ""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise DataError("missing" + tail, file=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"not valid JSON ({e}){tail}", file=path) from None
    if not isinstance(obj, dict):
        raise DataError("must be a JSON object" + tail, file=path)
    return obj


def write_json_atomic(path, obj):
    """Write JSON to path.tmp, flush to disk, then rename over path."""
    tmp = path + ".tmp"
    with naming(path), open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_tensors_atomic(path, tensors, metadata=None):
    """safetensors file written to path.tmp, then renamed over path."""
    tmp = path + ".tmp"
    with naming(path):
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def iter_jsonl(path, drop_torn_tail=False):
    """Yield (line_number, object) from a JSON Lines file.

    A missing file, invalid UTF-8 or a malformed line is a DataError naming the file and line. With
    drop_torn_tail (our own output files, on resume), a last line without its newline is a write
    cut short by a crash: it is skipped, never parsed as data.
    """
    if not os.path.isfile(path):
        raise DataError("no such file", file=path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    torn = lines[-1] != b""                                      # the last line has no newline
    for i, raw in enumerate(lines, 1):
        if drop_torn_tail and torn and i == len(lines):
            return
        obj = parse_line(raw, path, i)
        if obj is not None:
            yield i, obj


def parse_line(raw, path, i):
    """One JSON Lines line (bytes) -> its object, None for a blank line; errors name file and line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 (byte {e.start + 1} of the line)", file=path, line=i) from None
    if not line.strip():
        return None
    if line.lstrip().startswith("["):
        raise DataError("a JSON list, where JSON Lines (one object per line) is expected", file=path, line=i)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", file=path, line=i) from None
    except RecursionError:
        raise DataError("JSON nested too deeply", file=path, line=i) from None
    if not isinstance(obj, dict):
        raise DataError("each line must be a JSON object", file=path, line=i)
    return obj


class output_lock:
    """`with output_lock(path):` one writer per output file. An operating-system advisory lock on
    path.lock, released by the kernel when the process dies (a rerun after SIGKILL is never
    blocked); a second writer stops with one line."""

    def __init__(self, path):
        self.path = path + ".lock"

    def __enter__(self):
        import fcntl
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise DataError("another process is writing this output; wait for it or choose another --out",
                            file=self.path[:-5]) from None
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def owned(self):
        """Whether the lock file at the path is still the one this object locked: a folder removed
        and remade under a live run (by hand, or by another tool) must not pass as this run's."""
        try:
            return not self.f.closed and os.fstat(self.f.fileno()).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False

    def hold(self):
        """Take the lock outside a with block: it is held until this object is closed or freed, or
        the process ends."""
        return self.__enter__()

    def close(self):
        self.f.close()                                           # closing releases the lock

    def __del__(self):
        if getattr(self, "f", None) is not None and not self.f.closed:
            self.f.close()


# -- Outputs of the data stages: checked before a rerun appends, resumed by key ---------------

def check_output(out_path, inputs):
    """Refuse an output that is one of the inputs (appending to it would corrupt it), and an output
    that already holds records but no OUT.params.json (written by something else: its records
    could not be checked against this run's parameters)."""
    for path in inputs:
        if os.path.exists(out_path) and os.path.exists(path) and os.path.samefile(out_path, path):
            raise DataError("the output is the input file; choose another --out", file=out_path, field="--out")
    if os.path.isdir(out_path):
        raise DataError("a directory, where an output file is expected", file=out_path, field="--out")
    if not os.path.isfile(out_path + ".params.json") and holds_records(out_path):
        raise DataError("holds records but no .params.json beside it (not written by this stage, or its "
                        "parameters were lost); choose another --out", file=out_path, field="--out")


def holds_records(path):
    """Whether an output file exists with something in it."""
    return os.path.isfile(path) and os.path.getsize(path) > 0


def check_params(out_path, params):
    """The parameters that shape an output's records live beside it (OUT.params.json); a rerun with
    other values would mix two experiments in one file, so it stops with one line naming them. An
    output that holds no record yet (a first run that failed) takes the new parameters."""
    path = out_path + ".params.json"
    if os.path.isfile(path) and holds_records(out_path):
        with open(path) as f:
            stored = json.load(f)
        differ = sorted(k for k in set(stored) | set(params) if not same_setting(k, stored.get(k), params.get(k)))
        if differ:
            raise DataError("the output was written with other parameters: " + ", ".join(
                f"{k} {stored.get(k)!r} -> {params.get(k)!r}" for k in differ) + "; choose another --out", file=out_path)
    else:
        write_json_atomic(path, params)


def done_records(path, key):
    """{key: record} of the records already in an output file (a torn last line is cut off first)."""
    drop_torn_tail(path)
    if not os.path.isfile(path):
        return {}
    return {key(o): o for _, o in iter_jsonl(path)}


def check_keys(done, items, key, what):
    """Records already in an output must have been made from the same input: the same value of each
    field in `what` (the answer key; for labels also the correctness); a changed input stops
    instead of keeping stale records."""
    current = {key(x): x for x in items}
    for k, old in done.items():
        new = current.get(k)
        changed = next((f for f in what if old.get(f) != new.get(f)), None) if new is not None else None
        if changed:
            raise DataError(f"the output's record for {k!r} was made with another {changed} "
                            f"({old.get(changed)!r}, now {new.get(changed)!r}): the input changed since; "
                            "choose another --out", *new.get("_src", (None, None)), changed)


# Recorded settings that name a file or folder: two spellings of one path are one setting.
PATH_SETTINGS = ("model", "model_dir", "train", "meta", "eval", "image_root", "out")


def same_setting(key, old, new):
    """Whether a setting recorded for resume (an output's params, a run's config.json) agrees with
    this run's: paths compare by the file or folder they name (absolute, after links), whatever
    the spelling ('tiny' is a name, not a path); other values as they are."""
    def norm(v):
        if isinstance(v, list):
            return [norm(x) for x in v]
        return os.path.realpath(v) if isinstance(v, str) and key in PATH_SETTINGS and v != "tiny" else v
    return norm(old) == norm(new)


def file_digest(*paths):
    """SHA-1 over the bytes of files (a folder: its files, by name), to key cached results by content."""
    h = hashlib.sha1()
    for path in paths:
        for name in sorted(os.listdir(path)) if os.path.isdir(path) else [""]:
            full = os.path.join(path, name) if name else path
            if os.path.isfile(full):
                h.update(name.encode() + b"\0")
                with open(full, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 24), b""):
                        h.update(chunk)
    return h.hexdigest()


def drop_torn_tail(path):
    """Cut a half-written last line (no newline) off an output file before appending to it."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def append_jsonl(f, *records):
    """Append records (keys starting with '_' are in-memory only) and flush them to disk at once."""
    with naming(f.name):
        f.write("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n"
                        for r in records))
        f.flush()
        os.fsync(f.fileno())


# -- Plots -------------------------------------------------------------------------------------

def _text(d, xy, text, fill, font):
    """Draw text word by word: the default font's space is 2 pixels wide, which runs words together."""
    x, y = xy
    for word in text.split(" "):
        d.text((x, y), word, fill=fill, font=font)
        x += font.getlength(word) + font.size // 3
    return x


def line_plot(path, title, series, x_ticks, y_max, y_label, legend, x_title="", y_title=""):
    """A line chart drawn with Pillow (no plotting library needed), for the PNGs a person reads.

    series: {name: [(x, y), ...]}; x_ticks: [(x, text)] under the axis; y runs from 0 to y_max,
    labelled at six points by y_label(value); legend: {name: text} on the right; x_title and
    y_title name the axes (under the x axis, above the y axis).
    """
    W, H, L, R, T, B = 860, 450, 70, 290, 60, 60
    font = ImageFont.load_default(size=13)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [x for points in series.values() for x, _ in points] + [x for x, _ in x_ticks]
    x0, x1 = min(xs, default=0), max(xs, default=1)
    x1 = x1 if x1 > x0 else x0 + 1
    X = lambda x: L + (W - L - R) * (x - x0) / (x1 - x0)  # noqa: E731
    Y = lambda y: H - B - (H - T - B) * y / y_max  # noqa: E731
    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(6):
        _text(d, (8, Y(y_max * k / 5) - 7), y_label(y_max * k / 5), "black", font)
    for x, text in x_ticks:
        _text(d, (X(x) - 4, H - B + 6), text, "black", font)
    _text(d, (L, 10), title, "black", font)
    _text(d, (8, T - 28), y_title, "black", font)
    _text(d, (L + (W - L - R) / 2 - font.getlength(x_title) / 2, H - B + 28), x_title, "black", font)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf"]
    for k, (name, points) in enumerate(series.items()):
        color = colors[k % len(colors)]
        if len(points) > 1:
            d.line([(X(x), Y(y)) for x, y in points], fill=color, width=2)
        _text(d, (W - R + 10, T + 18 * k), legend[name], color, font)
    img.save(path)
