"""Tests for decode.metrics (against pycocoevalcap as the reference) and the decode.eval CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from decode import eval as eval_cli
from decode import metrics

bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
rouge_mod = pytest.importorskip("pycocoevalcap.rouge.rouge")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ["a", "dog", "cat", "on", "the", "grass", "red", "ball", "with", "man"]


def _sentence(rng: random.Random, max_len: int = 12) -> str:
    """A random tokenized sentence from a small vocabulary, with some edge cases mixed in."""
    kind = rng.random()
    if kind < 0.05:
        return ""  # empty after tokenization
    if kind < 0.12:
        return " ".join([rng.choice(VOCAB)] * rng.randint(1, 6))  # repeated unigram
    if kind < 0.20:
        pair = [rng.choice(VOCAB), rng.choice(VOCAB)]
        return " ".join(pair * rng.randint(1, 4))  # repeated bigram
    if kind < 0.25:
        return rng.choice(VOCAB)  # one word
    if kind < 0.30:
        return "zebra " + " ".join(rng.choice(VOCAB) for _ in range(rng.randint(0, 5)))
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(2, max_len)))


def _corpus(seed: int, num_images: int):
    """(gts, res) in pycocoevalcap's format: id -> list of references / [hypothesis]."""
    rng = random.Random(seed)
    gts, res = {}, {}
    for i in range(num_images):
        refs = [_sentence(rng) for _ in range(rng.randint(1, 5))]
        if all(not r for r in refs):
            refs.append("the dog")  # keep at least one non-empty reference in the set
        hyp = rng.choice(refs) if rng.random() < 0.1 else _sentence(rng)
        gts[i], res[i] = refs, [hyp]
    return gts, res


CORPORA = [(seed, n) for seed, n in zip(range(12), [1, 2, 3, 5, 8, 13, 20, 30, 40, 50, 60, 80])]


@pytest.mark.parametrize("seed,num_images", CORPORA)
def test_bleu_matches_pycocoevalcap(seed, num_images):
    gts, res = _corpus(seed, num_images)
    ref_score, ref_per_image = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    score, per_image = metrics.bleu({k: v[0] for k, v in res.items()}, gts)
    np.testing.assert_allclose(score, ref_score, rtol=0, atol=1e-6)
    np.testing.assert_allclose(per_image, ref_per_image, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed,num_images", CORPORA)
def test_cider_matches_pycocoevalcap(seed, num_images):
    gts, res = _corpus(seed, num_images)
    ref_score, ref_per_image = cider_mod.Cider().compute_score(gts, res)
    score, per_image = metrics.cider_d({k: v[0] for k, v in res.items()}, gts)
    assert abs(score - ref_score) <= 1e-6
    np.testing.assert_allclose(per_image, ref_per_image, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed,num_images", CORPORA)
def test_rouge_matches_pycocoevalcap(seed, num_images):
    gts, res = _corpus(seed, num_images)
    ref_score, ref_per_image = rouge_mod.Rouge().compute_score(gts, res)
    score, per_image = metrics.rouge_l({k: v[0] for k, v in res.items()}, gts)
    assert abs(score - ref_score) <= 1e-6
    np.testing.assert_allclose(per_image, ref_per_image, rtol=0, atol=1e-6)


def test_compute_metrics_keys_and_perfect_scores():
    refs = {"a.jpg": ["A dog runs on the grass.", "A brown dog running."],
            "b.jpg": ["Two cats sleep on a sofa!", "Cats on a red sofa."],
            "c.jpg": ["A man rides a bike.", "Someone on a bicycle."]}
    preds = {k: v[0] for k, v in refs.items()}
    notes = []
    out = metrics.compute_metrics(preds, refs, use_meteor=False, notes=notes)
    assert set(out) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert out[k] == pytest.approx(1.0, abs=1e-6)
    assert out["CIDEr-D"] > 1.0
    assert notes  # says METEOR was skipped and which tokenizer was used


def test_tokenize_examples():
    assert metrics.tokenize("A dog's toy, on the floor.") == "a dog 's toy on the floor"
    assert metrics.tokenize("It isn't a \"big\" cat; is it?") == "it is n't a big cat is it"
    assert metrics.tokenize("Mr. Smith at 10:30 with 1,000 people...") == \
        "mr. smith at 10:30 with 1,000 people"
    # PTB keeps brackets as -lrb-/-rrb- (pycocoevalcap's filter only lists -LRB-).
    assert metrics.tokenize("Two men (one in red)") == "two men -lrb- one in red -rrb-"
    assert metrics.tokenize("") == ""


PTB_SENTENCES = [
    "A dog's toy, on the floor.", "Two men (one in red) play frisbee!",
    "It's a \"big\" cat; isn't it?", "black-and-white photo of a train -- old",
    "A man e.g. Mr. Smith at St. Louis...", "3.5 inches / and/or $5 & 10%", "A CAT\nSITTING",
    "people's 'quoted' words", "U.S. flag at 5 p.m.", "don't can't won't they're we've I'd",
    "cats' toys", "hello ?! wow!!", "a [bracket] {brace}", "x:y 10:30 a:", "cannot",
    "A man riding a wave on top of a surfboard.", "A kitchen with a stove, sink and fridge.",
    "Two giraffes standing next to each other in a field.", "a  double  space",
    "A \u201cquoted\u201d word \u2014 dash", "it\u2019s here\u2026", "The 80's style tv.",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs java")
def test_tokenize_agrees_with_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer().tokenize(
        {i: [{"caption": s}] for i, s in enumerate(PTB_SENTENCES)})
    for i, sentence in enumerate(PTB_SENTENCES):
        assert metrics.tokenize(sentence) == ptb[i][0], sentence


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs java")
def test_compute_metrics_matches_full_pycocoevalcap_pipeline():
    """Raw captions: our tokenizer + scorers == PTBTokenizer (Java) + pycocoevalcap scorers."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {1: ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave!"],
            2: ["A kitchen with a stove, sink and fridge.", "The kitchen (small) is white."],
            3: ["Two giraffes standing next to each other.", "Giraffes aren't short; they're tall."],
            4: ["A dog's bowl on the floor.", "It's a \"red\" bowl; isn't it?"]}
    preds = {1: "A man surfing a wave.", 2: "A small kitchen with a stove and sink.",
             3: "Two giraffes in a field.", 4: "A red dog bowl."}
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    ours = metrics.compute_metrics(preds, refs, use_meteor=False)
    bleu_ref, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        assert ours[f"BLEU-{k + 1}"] == pytest.approx(bleu_ref[k], abs=1e-6)
    assert ours["CIDEr-D"] == pytest.approx(cider_mod.Cider().compute_score(gts, res)[0], abs=1e-6)
    assert ours["ROUGE-L"] == pytest.approx(rouge_mod.Rouge().compute_score(gts, res)[0], abs=1e-6)


@pytest.mark.skipif(os.environ.get("FASTVLM_TEST_METEOR") != "1",
                    reason="slow (the METEOR jar loads for 7-15 s); set FASTVLM_TEST_METEOR=1")
@pytest.mark.skipif(not metrics.meteor_available()[0], reason="METEOR needs java")
def test_meteor_when_java_available():
    refs = {1: ["a dog runs on the grass", "a brown dog running"],
            2: ["two cats sleep", "cats on a sofa"]}
    preds = {1: "a dog running on grass", 2: "a cat sleeping"}
    out = metrics.compute_metrics(preds, refs, tokenized=True, use_meteor=True)
    # Value from pycocoevalcap's Meteor() on the same input.
    assert out["METEOR"] == pytest.approx(0.2618696624284831, abs=1e-6)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

REFS = {
    "COCO_val2014_000000000001.jpg": ["A dog runs on the grass.", "A brown dog running."],
    "COCO_val2014_000000000002.jpg": ["Two cats sleep on a sofa.", "Cats on a red sofa."],
    "COCO_val2014_000000000003.jpg": ["A man rides a bike.", "Someone on a bicycle."],
}
PRED_ROWS = [
    {"image": "/data/val/COCO_val2014_000000000001.jpg", "caption": "A dog running on grass.",
     "token_ids": [1, 2]},                                                    # by basename
    {"image": "COCO_val2014_000000000002.png", "caption": "A cat on a sofa."},  # by stem
    {"image": "COCO_val2014_000000000003.jpg", "caption": "A man on a bike."},  # exact
    {"image": "missing.jpg", "caption": "nothing"},                           # no reference
    {"image": "x.jpg", "error": "decode failed"},                             # skipped
    {"image": "y.jpg"},                                                       # no caption
]


def _write_preds(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in PRED_ROWS) + "\n")
    return str(path)


def _expected():
    preds = {"p1": "A dog running on grass.", "p2": "A cat on a sofa.", "p3": "A man on a bike."}
    refs = dict(zip(["p1", "p2", "p3"], REFS.values()))
    return metrics.compute_metrics(preds, refs, use_meteor=False)


def _ref_files(tmp_path):
    """The same references in each accepted file format."""
    files = {}
    files["dict.json"] = json.dumps(REFS)
    files["rows.jsonl"] = "\n".join(json.dumps({"image": k, "captions": v}) for k, v in REFS.items())
    files["single.jsonl"] = "\n".join(
        json.dumps({"image": k, "caption": c}) for k, v in REFS.items() for c in v)
    coco = {"images": [{"id": i + 1, "file_name": k} for i, k in enumerate(REFS)],
            "annotations": [{"image_id": i + 1, "id": 10 * i + j, "caption": c}
                            for i, v in enumerate(REFS.values()) for j, c in enumerate(v)]}
    files["coco.json"] = json.dumps(coco)
    paths = []
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    return paths


def test_cli_end_to_end_all_reference_formats(tmp_path, capsys):
    pred = _write_preds(tmp_path)
    expected = _expected()
    for refs in _ref_files(tmp_path):
        out_json = tmp_path / "metrics.json"
        rc = eval_cli.main(["--pred", pred, "--refs", refs, "--json", str(out_json),
                            "--meteor", "off"])
        assert rc == 0, refs
        report = json.loads(out_json.read_text())
        for key, value in expected.items():
            assert report[key] == pytest.approx(value, abs=1e-12), (refs, key)
        counts = report["counts"]
        assert counts["scored"] == 3 and counts["no_reference"] == 1
        assert counts["skipped_error"] == 1 and counts["skipped_no_caption"] == 1
        assert report["matched_by"] == {"basename": 1, "stem": 1, "exact": 1}
        printed = capsys.readouterr().out
        assert "CIDEr-D" in printed and "1 without reference" in printed


def test_cli_coco_numeric_ids(tmp_path):
    """Predictions named by COCO image id (or ending in it) match COCO annotations."""
    coco_path = [p for p in _ref_files(tmp_path) if p.endswith("coco.json")][0]
    pred = tmp_path / "ids.jsonl"
    pred.write_text("\n".join([json.dumps({"image": "1", "caption": "a dog"}),
                               json.dumps({"image": "tfds:coco:val/000002", "caption": "a cat"})]))
    report = eval_cli.evaluate(str(pred), coco_path, use_meteor=False)
    assert report["counts"]["scored"] == 2
    assert report["matched_by"] == {"exact": 1, "id": 1}


def test_cli_module_runs_and_fails_clearly_on_missing_file(tmp_path):
    pred = _write_preds(tmp_path)
    refs = _ref_files(tmp_path)[0]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    cmd = [sys.executable, "-m", "decode.eval"]
    ok = subprocess.run(cmd + ["--pred", pred, "--refs", refs, "--meteor", "off"],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "BLEU-4" in ok.stdout

    missing = str(tmp_path / "nope.jsonl")
    bad = subprocess.run(cmd + ["--pred", missing, "--refs", refs],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2
    err_lines = bad.stderr.strip().splitlines()
    assert len(err_lines) == 1 and missing in err_lines[0] and "decode.run" in err_lines[0]

    bad_refs = subprocess.run(cmd + ["--pred", pred, "--refs", str(tmp_path / "r.json")],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert bad_refs.returncode == 2 and "r.json" in bad_refs.stderr
    assert len(bad_refs.stderr.strip().splitlines()) == 1

    unknown = subprocess.run(cmd + ["--pred", pred, "--refs", refs, "--bogus"],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and "--bogus" in unknown.stderr


def test_tfds_references_hook(monkeypatch):
    """load_tfds_references reads iter_tfds_images and explains when the module is absent."""
    import fastvlm_jax.data as data_pkg

    monkeypatch.delattr(data_pkg, "tfds_builders", raising=False)
    monkeypatch.setitem(sys.modules, "fastvlm_jax.data.tfds_builders", None)
    with pytest.raises(eval_cli.EvalError, match="tfds_builders"):
        eval_cli.load_tfds_references("tfds:coco_captions:val")

    calls = []

    def iter_tfds_images(spec, data_dir):
        calls.append((spec, data_dir))
        yield np.int64(7), None, np.array([b"A dog.", b"A puppy."], dtype=object)
        yield b"img8", None, "A cat."

    fake = types.ModuleType("fastvlm_jax.data.tfds_builders")
    fake.iter_tfds_images = iter_tfds_images
    monkeypatch.setitem(sys.modules, "fastvlm_jax.data.tfds_builders", fake)
    monkeypatch.setattr(data_pkg, "tfds_builders", fake, raising=False)
    refs = eval_cli.load_tfds_references("tfds:coco_captions:val", "/tmp/tfds")
    assert refs == {"7": ["A dog.", "A puppy."], "img8": ["A cat."]}
    assert calls == [("tfds:coco_captions:val", "/tmp/tfds")]
