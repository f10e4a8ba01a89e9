"""Using a trained PRM on new data: unlabelled reranking, image and length limits, a self-describing
PRM directory, strict loading, the supported backbones."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import bilevel_train as bt
import gen_cots
import prm
import rerank
from test_formats import labels_row, write_jsonl
from test_prm import QUESTION, make_steps


def make_test_cots(images):
    """Three questions, interleaved in the file; q1 has no answer key or correctness at all."""
    rows = []
    for k in range(4):
        for q, image in (("q0", images[0]), ("q1", None), ("q2", images[2])):
            row = {"id": q, "domain": "d", "question": f"Question {q}?", "image": image, "sample": k,
                   "steps": make_steps(1 + (k + len(rows)) % 4, k), "final": str(k % 2), "pred": str(k % 2),
                   "answer": "1", "correct": k % 2 == 1}
            if q == "q1":
                del row["answer"], row["correct"]
            rows.append(row)
    return rows


def brute_force(model, records):
    """One packed forward per CoT, the PRM's own aggregation."""
    with torch.no_grad():
        out = []
        for r in records:
            v, m = prm.step_values(model, [model.encode(r)])
            out.append((prm.aggregate(v, m, model.aggregation).item(), v[0][m[0]].tolist()))
    return out


def test_unlabelled_rerank_equals_brute_force(tmp_path, images, backbone_dir, capsys):
    path = write_jsonl(tmp_path / "test.jsonl", make_test_cots(images))
    dirs = []
    for seed in (1, 2):
        d = str(tmp_path / f"prm{seed}")
        prm.PRM.from_backbone(backbone_dir, seed=seed).save_pretrained(d)
        dirs.append(d)
    out = tmp_path / "out"
    assert rerank.main(["--cots", path, "--prm", *dirs, "--names", "a,b", "--out", str(out)]) == 0
    assert "1 questions without `correct` on every CoT: left out of the table" in capsys.readouterr().out
    scores = [json.loads(x) for x in open(out / "scores.jsonl")]
    picks = [json.loads(x) for x in open(out / "picks.jsonl")]
    records, _ = prm.read_cots(path, "test")
    assert [(s["id"], s["sample"]) for s in scores] == sorted(((r["id"], r["sample"]) for r in records),
                                                               key=lambda x: (x[0], x[1]))
    by_key = {(r["id"], r["sample"]): r for r in records}
    for name, d in zip(("a", "b"), dirs):
        model = prm.PRM.from_pretrained(d).eval()
        expected = dict(zip([(s["id"], s["sample"]) for s in scores],
                            brute_force(model, [by_key[(s["id"], s["sample"])] for s in scores])))
        for s in scores:
            score, steps = expected[(s["id"], s["sample"])]
            assert abs(s["prms"][name]["score"] - score) <= 1e-5
            assert max(abs(x - y) for x, y in zip(s["prms"][name]["steps"], steps)) <= 1e-5
        for q in ("q0", "q1", "q2"):
            cands = sorted((k for k in expected if k[0] == q), key=lambda k: k[1])
            best = max(cands, key=lambda k: (expected[k][0], -k[1]))        # highest score, lowest sample
            (pick,) = [p for p in picks if p["id"] == q and p["prm"] == name]
            assert pick["sample"] == best[1] and pick["pred"] == by_key[best]["pred"]
            assert abs(pick["score"] - expected[best][0]) <= 1e-5
    results = json.load(open(out / "results.json"))
    assert results["table"]["overall"]["questions"] == 2 and results["unlabelled_questions"] == 1


def test_rerank_without_any_labels_writes_scores_and_picks_only(tmp_path, images, backbone_dir, capsys):
    rows = [dict(r) for r in make_test_cots(images) if r["id"] == "q1"]
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "out"
    d = str(tmp_path / "prm")
    prm.PRM.from_backbone(backbone_dir).save_pretrained(d)
    assert rerank.main(["--cots", path, "--prm", d, "--out", str(out)]) == 0
    assert "no question has `correct` on every CoT: no accuracy table" in capsys.readouterr().out
    assert len((out / "scores.jsonl").read_text().splitlines()) == 4
    assert len((out / "picks.jsonl").read_text().splitlines()) == 1 and not (out / "results.json").exists()


def test_rerank_resumes_a_killed_scoring_pass(tmp_path, images, backbone_dir, monkeypatch):
    """A part file cut after one question: the rerun scores only the rest, and the outputs equal
    an uninterrupted run's."""
    path = write_jsonl(tmp_path / "test.jsonl", make_test_cots(images))
    d = str(tmp_path / "prm")
    prm.PRM.from_backbone(backbone_dir, seed=1).save_pretrained(d)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert rerank.main(["--cots", path, "--prm", d, "--out", str(full)]) == 0
    calls = []
    real = rerank.score_question

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(rerank, "score_question", dying)
    with pytest.raises(KeyboardInterrupt):
        rerank.main(["--cots", path, "--prm", d, "--out", str(cut)])
    calls.clear()
    monkeypatch.setattr(rerank, "score_question", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert rerank.main(["--cots", path, "--prm", d, "--out", str(cut)]) == 0
    assert len(calls) == 2                                       # 3 questions, the first was done
    for name in ("scores.jsonl", "picks.jsonl"):
        assert (full / name).read_text() == (cut / name).read_text()
    assert not [n for n in os.listdir(cut) if n.startswith(".scores")]


def test_image_limit_bounds_the_image_tokens(tmp_path, backbone_dir):
    model = prm.PRM.from_backbone(backbone_dir)
    model.min_pixels, model.max_pixels = 56 * 56, 12845056       # Qwen2-VL's own default range
    tokens = {}
    for w, h in [(1920, 1080), (3000, 2000)]:
        path = str(tmp_path / f"{w}.png")
        Image.new("RGB", (w, h), (90, 160, 30)).save(path)
        for side in (512, None):
            model.max_side = side
            model.image_cache.clear()
            e = model.encode({"question": QUESTION, "steps": ["Step 1: a"], "_image": path})
            n = int((e.input_ids == model.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
            assert n == int(e.images["image_grid_thw"].prod()) // 4
            tokens[(w, side)] = n
    assert tokens[(1920, 512)] == 180                              # the README's figure
    assert tokens[(1920, None)] == 2691 and tokens[(3000, None)] == 7597
    assert tokens[(3000, 512)] <= (512 // 28 + 1) ** 2 and tokens[(3000, 512)] < tokens[(3000, None)] / 20


def test_length_guard_skips_and_counts(tmp_path, images, backbone_dir, capsys):
    rows = [labels_row(f"t{i}", f"Q{i}?", None, correct=i % 2 == 0) for i in range(4)]
    rows[1]["steps"] = ["Step 1: " + "we count the shapes " * 60, "Step 2: b"]      # far longer than the rest
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    meta = write_jsonl(tmp_path / "meta.jsonl", [labels_row("m1", "M1?"), labels_row("m2", "M2?", correct=False)])
    out = str(tmp_path / "run")
    assert bt.main(["--train", train, "--meta", meta, "--out", out, "--iterations", "1", "--unroll-steps", "1",
                    "--train-batch", "2", "--meta-batch", "2", "--max-length", "120"]) == 0
    assert "1 training CoTs longer than 120 tokens: skipped" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "prm", "prm.json")))["max_length"] == 120
    res = tmp_path / "res"
    assert rerank.main(["--cots", train, "--prm", out, "--out", str(res)]) == 0
    assert "1 CoTs longer than the PRM's max_length: not scored" in capsys.readouterr().out
    scores = {json.loads(x)["id"]: json.loads(x) for x in open(res / "scores.jsonl")}
    assert scores["t1"]["prms"]["DreamPRM (run)"]["score"] is None and scores["t0"]["prms"]["DreamPRM (run)"]["score"] is not None
    picks = {json.loads(x)["id"]: json.loads(x) for x in open(res / "picks.jsonl")}
    assert picks["t1"]["sample"] is None and picks["t0"]["sample"] == 0


def test_prm_directory_describes_itself(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert bt.main(["--synthetic", "--out", out, "--iterations", "2", "--unroll-steps", "1", "--max-side", "256"]) == 0
    meta = json.load(open(os.path.join(out, "prm", "prm.json")))
    for key in ("format", "step_sep", "final_answer", "final_prefix", "max_side", "min_pixels", "max_pixels",
                "max_length", "aggregation", "head", "prompt", "backbone_class", "model_type", "versions"):
        assert key in meta, key
    assert meta["max_side"] == 256 and meta["aggregation"] == "mean_logit" and meta["format"] == prm.PRM_FORMAT
    card = open(os.path.join(out, "prm", "README.md")).read()
    assert "learned domain weights: clean" in card and "training CoTs: 144" in card
    assert f"commit {meta['code']['commit']}" in card and "None / None" not in card
    code = card[card.index("```python") + 10:card.index("```", card.index("```python") + 10)]
    elsewhere = tmp_path / "elsewhere"                    # the example runs as written, from another folder
    elsewhere.mkdir()
    (elsewhere / "example.py").write_text(code.replace("THIS_DIRECTORY", os.path.join(out, "prm")))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "example.py"], cwd=elsewhere, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 0 and 0 < float(done.stdout.strip().splitlines()[-1]) < 1, done.stderr
    assert all(os.stat(os.path.join(out, "prm", n)).st_mode & 0o044 == 0o044 for n in os.listdir(os.path.join(out, "prm")))
    model = prm.PRM.from_pretrained(out)
    assert model.max_side == 256 and model.aggregation == "mean_logit"


@pytest.fixture(scope="module")
def saved_prm(tmp_path_factory, backbone_dir):
    path = str(tmp_path_factory.mktemp("strict") / "prm")
    prm.PRM.from_backbone(backbone_dir).save_pretrained(path)
    return path


def damaged(tmp_path, saved_prm, how):
    d = str(tmp_path / how)
    shutil.copytree(saved_prm, d)
    weights = os.path.join(d, "model.safetensors")
    w = load_file(weights)
    if how == "missing_layer":
        save_file({k: v for k, v in w.items() if ".layers.1." not in k}, weights, metadata={"format": "pt"})
    elif how == "wrong_shape":
        k = next(k for k in w if k.endswith("layers.0.mlp.up_proj.weight"))
        w[k] = torch.zeros(w[k].shape[0] + 1, w[k].shape[1])
        save_file(w, weights, metadata={"format": "pt"})
    elif how == "unexpected":
        w["language_model.extra.weight"] = torch.zeros(2)
        save_file(w, weights, metadata={"format": "pt"})
    elif how == "truncated":
        data = open(weights, "rb").read()
        open(weights, "wb").write(data[:len(data) // 2])
    elif how == "no_tokenizer":
        os.remove(os.path.join(d, "tokenizer.json"))
    elif how == "head_shape":
        save_file({"head.weight": torch.zeros(1, 3), "head.bias": torch.zeros(1)}, os.path.join(d, "prm.safetensors"))
    return d


@pytest.mark.parametrize("how,words", [
    ("missing_layer", "weights do not match the model's config: missing language_model.layers.1."),
    ("wrong_shape", "wrong shape language_model.layers.0.mlp.up_proj.weight"),
    ("unexpected", "unexpected language_model.extra.weight"),
    ("truncated", "cannot load the backbone"),
    ("no_tokenizer", "cannot load the tokenizer"),
    ("head_shape", "prm.safetensors: tensor head.weight: expected shape (1, 64), found (1, 3)"),
])
def test_strict_loading(tmp_path, saved_prm, images, capsys, how, words):
    d = damaged(tmp_path, saved_prm, how)
    path = write_jsonl(tmp_path / "test.jsonl", [labels_row("q", "Q?")])
    code = prm.run_cli(rerank.main, ["--cots", path, "--prm", d, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_qwen25_vl_backbone_scores_alike_three_ways(qwen25_dir, images):
    model = prm.PRM.from_backbone(qwen25_dir).eval()
    assert type(model.backbone).__name__ == "Qwen2_5_VLModel"
    cots = [prm.encode_cot(model.tokenizer, QUESTION, make_steps(n, b), "7", images[1], model.image_processor,
                           family=model.family) for b, n in enumerate([2, 5, 3])]
    with torch.no_grad():
        v, m = prm.step_values(model, cots)
        v_ref, _ = prm.prefix_values(model, cots)
        v_shared, _ = prm.shared_prefix_values(model, cots)
    assert (v - v_ref)[m].abs().max() <= 1e-5 and (v - v_shared)[m].abs().max() <= 1e-4 and v[m].std() > 1e-3


@pytest.mark.parametrize("model_type,why", [("mllama", "feeds the image to cross-attention layers"),
                                            ("paligemma", "")])
def test_unsupported_backbone_stops_at_load(tmp_path, backbone_dir, model_type, why):
    d = str(tmp_path / model_type)
    shutil.copytree(backbone_dir, d)
    config = json.load(open(os.path.join(d, "config.json")))
    config["model_type"] = model_type
    json.dump(config, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(prm.DataError) as info:
        prm.PRM.from_backbone(d)
    msg = str(info.value)
    assert f"model type '{model_type}' is not supported" in msg and why in msg and "text-only" in msg
    assert "qwen2_vl, qwen2_5_vl, qwen3_vl, internvl, llava_onevision, gemma3, idefics3, smolvlm" in msg


def test_hf_policy_on_a_text_only_lm(tmp_path, text_lm_dir):
    q = write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "domain": "d", "question": "What is 3 + 4?", "answer": "7"}])
    out = str(tmp_path / "c.jsonl")
    assert gen_cots.main(["--questions", q, "--out", out, "--policy", "hf", "--model", text_lm_dir, "--n", "2",
                          "--max-tokens", "8"]) == 0
    records = [json.loads(x) for x in open(out)]
    assert len(records) == 2 and all(r["policy"].startswith("hf:") for r in records)


def test_encode_takes_a_line_of_a_cots_file(tmp_path, images, tiny_prm):
    """A record as a CoTs file holds it, its image path resolved against an image root, scores as the
    readers' record does; an image that cannot be used is an error, never a text-only score."""
    row = dict(labels_row("q", "Q?", os.path.basename(images[0])))
    (read,), _ = prm.read_cots(write_jsonl(tmp_path / "c.jsonl", [row]), "labels")
    a, b = tiny_prm.encode(row, image_root=str(tmp_path)), tiny_prm.encode(read)
    assert torch.equal(a.input_ids, b.input_ids) and a.images is not None
    with pytest.raises(prm.DataError, match="no such image file"):
        tiny_prm.encode(row, image_root=str(tmp_path / "nowhere"))
