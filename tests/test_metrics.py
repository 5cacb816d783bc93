"""Tests for decode.metrics (pycocoevalcap's scorers, our Java-free tokenizer) and decode.eval."""

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
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from decode import eval as eval_cli
from decode import metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a java executable")

# Pieces of caption-like sentences, with the punctuation, case, clitics, numbers, brackets
# and Unicode quotes/dashes that captions contain and that the tokenizer must handle.
SUBJECTS = [
    "a man",
    "two dogs",
    "the woman's cat",
    "a black-and-white photo of a train",
    "Mr. Smith",
    "U.S. soldiers",
    "3 kids",
    "a young girl",
    "people",
    "an old bus",
    "the giraffes",
    "a surfer",
    "someone",
    "a kitchen",
    "the dogs' owner",
    "a woman\u2019s hat",
    "a 3.5 inch phone",
    "kids [left]",
]
VERBS = [
    "riding",
    "sitting on",
    "standing next to",
    "isn't near",
    "aren't on",
    "looking at",
    "walking past",
    "holding",
    "can't reach",
    "won't leave",
    "is eating",
    "playing with",
    "parked by",
    "jumping over",
    "they're near",
    "cannot see",
    "buying",
]
OBJECTS = [
    "a wave",
    "the grass",
    "a red (old) bike",
    'a "big" sofa',
    "the surfboard",
    "a stove, sink and fridge",
    "1,000 people",
    "a clock at 10:30",
    "the dog's bowl",
    "a pizza",
    "the street",
    "a field",
    "a brown-and-white horse",
    "the 5 p.m. train",
    "two frisbees",
    "a table; a chair",
    "a tree -- outside",
    "a kite",
    "a \u201cvintage\u201d car",
    "a $5 hat & 10% off",
    "fruit, e.g. apples",
    "a '90s radio",
    "a sign: stop",
]
# No abbreviation right before the sentence end: PTB keeps "u.s." in "in the U.S..", we
# drop its period (a known difference, see decode.metrics).
TAILS = [
    "",
    " in a field",
    " on a sunny day",
    " at night",
    " with friends",
    " near the beach",
    ", outdoors",
    " in a U.S. city",
    " (close up)",
    " \u2014 again",
    " and more",
]
ENDS = ["", ".", ".", "!", "?", "...", " .", "!!", "\u2026", "?!"]


def _caption(rng: random.Random) -> str:
    """A random raw caption: subject, verb, object, tail, end punctuation, varied case."""
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}"
    text += rng.choice(ENDS)
    case = rng.random()
    if case < 0.5:
        text = text[0].upper() + text[1:]
    elif case < 0.6:
        text = text.upper()
    elif case < 0.7:
        text = text.title()
    if rng.random() < 0.1:
        text = "  " + text.replace(" ", "  ", 1) + " "  # extra spaces
    return text


def _caption_pairs(seed: int = 0, num_images: int = 500):
    """(predictions, references): id -> caption and id -> 1-5 captions, raw text.

    One prediction in ten is one of its references (a perfect match).
    """
    rng = random.Random(seed)
    predictions, references = {}, {}
    for i in range(num_images):
        key = f"img{i}"
        references[key] = [_caption(rng) for _ in range(rng.randint(1, 5))]
        predictions[key] = rng.choice(references[key]) if rng.random() < 0.1 else _caption(rng)
    return predictions, references


def _pycocoevalcap_scores(gts: dict, res: dict) -> dict:
    """pycocoevalcap's scorers called directly on tokenized gts/res (its own format)."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr-D"] = Cider().compute_score(gts, res)[0]
    return scores


# What decode.metrics reported for _caption_pairs(0, 500) before it called pycocoevalcap
# (it had its own BLEU, ROUGE-L and CIDEr-D): the numbers must not move.
PAIRS_500_BEFORE = {
    "BLEU-1": 0.3862741421338109,
    "BLEU-2": 0.2869181574069726,
    "BLEU-3": 0.23418443389280805,
    "BLEU-4": 0.19963119151360725,
    "ROUGE-L": 0.31545395972815077,
    "CIDEr-D": 0.6393313978567311,
}


def test_compute_metrics_matches_pycocoevalcap_scorers_on_500_pairs():
    predictions, references = _caption_pairs()
    notes = []
    ours = metrics.compute_metrics(predictions, references, use_meteor=False, notes=notes)
    gts = {k: [metrics.tokenize(r) for r in v] for k, v in references.items()}
    res = {k: [metrics.tokenize(predictions[k])] for k in references}
    expected = _pycocoevalcap_scores(gts, res)
    assert list(ours) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"]
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
        assert ours[key] == pytest.approx(PAIRS_500_BEFORE[key], abs=1e-12), key
    assert metrics.TOKENIZER_NOTES["python"] in notes


def _token_corpus(seed: int, num_images: int):
    """Tokenized (gts, res) from a small vocabulary, with edge cases: empty captions,
    repeated unigrams/bigrams, one-word captions, words absent from every reference."""
    vocab = ["a", "dog", "cat", "on", "the", "grass", "red", "ball", "with", "man"]
    rng = random.Random(seed)

    def sentence():
        kind = rng.random()
        if kind < 0.05:
            return ""
        if kind < 0.12:
            return " ".join([rng.choice(vocab)] * rng.randint(1, 6))
        if kind < 0.20:
            return " ".join([rng.choice(vocab), rng.choice(vocab)] * rng.randint(1, 4))
        if kind < 0.25:
            return rng.choice(vocab)
        if kind < 0.30:
            return "zebra " + " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 5)))
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 12)))

    gts, res = {}, {}
    for i in range(num_images):
        refs = [sentence() for _ in range(rng.randint(1, 5))]
        if all(not r for r in refs):
            refs.append("the dog")  # keep at least one non-empty reference in the set
        gts[i] = refs
        res[i] = [rng.choice(refs) if rng.random() < 0.1 else sentence()]
    return gts, res


@pytest.mark.parametrize("seed,num_images", [(0, 1), (1, 2), (2, 3), (3, 13), (4, 80)])
def test_compute_metrics_tokenized_edge_cases(seed, num_images):
    """tokenized=True passes captions to the scorers untouched (empty ones included)."""
    gts, res = _token_corpus(seed, num_images)
    ours = metrics.compute_metrics({k: v[0] for k, v in res.items()}, gts, tokenized=True, use_meteor=False)
    for key, value in _pycocoevalcap_scores(gts, res).items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_compute_metrics_keys_and_perfect_scores():
    refs = {
        "a.jpg": ["A dog runs on the grass.", "A brown dog running."],
        "b.jpg": ["Two cats sleep on a sofa!", "Cats on a red sofa."],
        "c.jpg": ["A man rides a bike.", "Someone on a bicycle."],
    }
    preds = {k: v[0] for k, v in refs.items()}
    notes = []
    out = metrics.compute_metrics(preds, refs, use_meteor=False, notes=notes)
    assert set(out) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert out[k] == pytest.approx(1.0, abs=1e-6)
    assert out["CIDEr-D"] > 1.0
    assert notes  # says METEOR was skipped and which tokenizer was used


def test_compute_metrics_input_errors():
    with pytest.raises(KeyError, match="no references"):
        metrics.compute_metrics({1: "a dog"}, {2: ["a dog"]}, use_meteor=False)
    with pytest.raises(ValueError, match="non-empty list"):
        metrics.compute_metrics({1: "a dog"}, {1: []}, use_meteor=False)
    with pytest.raises(ValueError, match="tokenizer"):
        metrics.compute_metrics({1: "a dog"}, {1: ["a dog"]}, tokenizer="nltk")


def test_tokenize_examples():
    assert metrics.tokenize("A dog's toy, on the floor.") == "a dog 's toy on the floor"
    assert metrics.tokenize('It isn\'t a "big" cat; is it?') == "it is n't a big cat is it"
    assert metrics.tokenize("Mr. Smith at 10:30 with 1,000 people...") == "mr. smith at 10:30 with 1,000 people"
    # PTB keeps brackets as -lrb-/-rrb- (pycocoevalcap's filter only lists -LRB-).
    assert metrics.tokenize("Two men (one in red)") == "two men -lrb- one in red -rrb-"
    assert metrics.tokenize("") == ""


PTB_SENTENCES = [
    "A dog's toy, on the floor.",
    "Two men (one in red) play frisbee!",
    "It's a \"big\" cat; isn't it?",
    "black-and-white photo of a train -- old",
    "A man e.g. Mr. Smith at St. Louis...",
    "3.5 inches / and/or $5 & 10%",
    "A CAT\nSITTING",
    "people's 'quoted' words",
    "U.S. flag at 5 p.m.",
    "don't can't won't they're we've I'd",
    "cats' toys",
    "hello ?! wow!!",
    "a [bracket] {brace}",
    "x:y 10:30 a:",
    "cannot",
    "A man riding a wave on top of a surfboard.",
    "A kitchen with a stove, sink and fridge.",
    "Two giraffes standing next to each other in a field.",
    "a  double  space",
    "A \u201cquoted\u201d word \u2014 dash",
    "it\u2019s here\u2026",
    "The 80's style tv.",
]


@needs_java
def test_tokenize_agrees_with_ptbtokenizer():
    ptb = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(PTB_SENTENCES)})
    for i, sentence in enumerate(PTB_SENTENCES):
        assert metrics.tokenize(sentence) == ptb[i][0], sentence


@needs_java
def test_tokenize_agrees_with_ptbtokenizer_on_500_pairs():
    """Every caption of the 500 random pairs: our tokens == pycocoevalcap's PTBTokenizer's."""
    predictions, references = _caption_pairs()
    captions = [c for k in predictions for c in [predictions[k], *references[k]]]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    mismatches = [
        (c, metrics.tokenize(c), ptb[i][0]) for i, c in enumerate(captions) if metrics.tokenize(c) != ptb[i][0]
    ]
    assert not mismatches, mismatches[:5]


@needs_java
def test_ptb_tokenizer_option():
    """tokenizer="ptb" runs PTBTokenizer once, keeps captions in place, and says so."""
    # A line break inside a caption would shift the jar's output lines by one.
    captions = ["x\ry", "A dog.", "b\u2028c", "", "The END!"]
    assert metrics.tokenize_ptb(captions) == ["x y", "a dog", "b c", "", "the end"]
    predictions, references = _caption_pairs(num_images=50)
    notes = []
    ptb = metrics.compute_metrics(predictions, references, tokenizer="ptb", use_meteor=False, notes=notes)
    assert ptb == metrics.compute_metrics(predictions, references, use_meteor=False)
    assert metrics.TOKENIZER_NOTES["ptb"] in notes


@needs_java
def test_compute_metrics_matches_full_pycocoevalcap_pipeline():
    """Raw captions: our tokenizer + scorers == PTBTokenizer (Java) + pycocoevalcap scorers."""
    refs = {
        1: ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave!"],
        2: ["A kitchen with a stove, sink and fridge.", "The kitchen (small) is white."],
        3: ["Two giraffes standing next to each other.", "Giraffes aren't short; they're tall."],
        4: ["A dog's bowl on the floor.", "It's a \"red\" bowl; isn't it?"],
    }
    preds = {
        1: "A man surfing a wave.",
        2: "A small kitchen with a stove and sink.",
        3: "Two giraffes in a field.",
        4: "A red dog bowl.",
    }
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    ours = metrics.compute_metrics(preds, refs, use_meteor=False)
    for key, value in _pycocoevalcap_scores(gts, res).items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


@needs_java
def test_meteor_jar_failure_is_an_error_not_a_hang():
    """A jar that dies gives a RuntimeError, and the process still exits (the wrapper's
    __del__ waits for a lock its compute_score leaves taken on an error)."""
    code = (
        "import pycocoevalcap.meteor.meteor as m\n"
        "from decode import metrics\n"
        "start = m.Meteor.__init__\n"
        "def dead_jar(self):\n"
        "    start(self)\n"
        "    self.meteor_p.kill()\n"
        "    self.meteor_p.wait()\n"
        "m.Meteor.__init__ = dead_jar\n"
        "try:\n"
        "    metrics.meteor({1: 'a dog'}, {1: ['a dog']}, timeout_s=60)\n"
        "except RuntimeError as exc:\n"
        "    print('error:', exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "error: METEOR jar failed" in done.stdout


@pytest.mark.skipif(
    os.environ.get("FASTVLM_TEST_METEOR") != "1",
    reason="slow (the METEOR jar loads for 7-15 s); set FASTVLM_TEST_METEOR=1",
)
@needs_java
def test_meteor_when_java_available():
    refs = {1: ["a dog runs on the grass", "a brown dog running"], 2: ["two cats sleep", "cats on a sofa"]}
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
    {
        "image": "/data/val/COCO_val2014_000000000001.jpg",
        "caption": "A dog running on grass.",
        "token_ids": [1, 2],
    },  # by basename
    {"image": "COCO_val2014_000000000002.png", "caption": "A cat on a sofa."},  # by stem
    {"image": "COCO_val2014_000000000003.jpg", "caption": "A man on a bike."},  # exact
    {"image": "missing.jpg", "caption": "nothing"},  # no reference
    {"image": "x.jpg", "error": "decode failed"},  # skipped
    {"image": "y.jpg"},  # no caption
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
    files["single.jsonl"] = "\n".join(json.dumps({"image": k, "caption": c}) for k, v in REFS.items() for c in v)
    coco = {
        "images": [{"id": i + 1, "file_name": k} for i, k in enumerate(REFS)],
        "annotations": [
            {"image_id": i + 1, "id": 10 * i + j, "caption": c}
            for i, v in enumerate(REFS.values())
            for j, c in enumerate(v)
        ],
    }
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
        rc = eval_cli.main(["--pred", pred, "--refs", refs, "--json", str(out_json), "--meteor", "off"])
        assert rc == 0, refs
        report = json.loads(out_json.read_text())
        for key, value in expected.items():
            assert report[key] == pytest.approx(value, abs=1e-12), (refs, key)
        counts = report["counts"]
        assert counts["scored"] == 3 and counts["no_reference"] == 1
        assert counts["skipped_error"] == 1 and counts["skipped_no_caption"] == 1
        assert report["matched_by"] == {"basename": 1, "stem": 1, "exact": 1}
        assert report["tokenizer"] == "python"
        assert metrics.TOKENIZER_NOTES["python"] in report["notes"]
        printed = capsys.readouterr().out
        assert "CIDEr-D" in printed and "1 without reference" in printed


def test_cli_coco_numeric_ids(tmp_path):
    """Predictions named by COCO image id (or ending in it) match COCO annotations."""
    coco_path = [p for p in _ref_files(tmp_path) if p.endswith("coco.json")][0]
    pred = tmp_path / "ids.jsonl"
    pred.write_text(
        "\n".join(
            [
                json.dumps({"image": "1", "caption": "a dog"}),
                json.dumps({"image": "tfds:coco:val/000002", "caption": "a cat"}),
            ]
        )
    )
    report = eval_cli.evaluate(str(pred), coco_path, use_meteor=False)
    assert report["counts"]["scored"] == 2
    assert report["matched_by"] == {"exact": 1, "id": 1}


def test_cli_module_runs_and_fails_clearly_on_missing_file(tmp_path):
    pred = _write_preds(tmp_path)
    refs = _ref_files(tmp_path)[0]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    cmd = [sys.executable, "-m", "decode.eval"]
    ok = subprocess.run(
        cmd + ["--pred", pred, "--refs", refs, "--meteor", "off"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "BLEU-4" in ok.stdout

    missing = str(tmp_path / "nope.jsonl")
    bad = subprocess.run(
        cmd + ["--pred", missing, "--refs", refs], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2
    err_lines = bad.stderr.strip().splitlines()
    assert len(err_lines) == 1 and missing in err_lines[0] and "decode.run" in err_lines[0]

    bad_refs = subprocess.run(
        cmd + ["--pred", pred, "--refs", str(tmp_path / "r.json")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad_refs.returncode == 2 and "r.json" in bad_refs.stderr
    assert len(bad_refs.stderr.strip().splitlines()) == 1

    unknown = subprocess.run(
        cmd + ["--pred", pred, "--refs", refs, "--bogus"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "--bogus" in unknown.stderr


def test_cli_without_java(tmp_path):
    """No java on PATH: the default run works (METEOR left out, said in a note), and what
    needs Java (--meteor on, --tokenizer ptb) fails with one line, not a traceback."""
    pred = _write_preds(tmp_path)
    refs = _ref_files(tmp_path)[0]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, PATH=str(tmp_path))  # no java in there
    cmd = [sys.executable, "-m", "decode.eval", "--pred", pred, "--refs", refs]
    ok = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "METEOR omitted: no `java`" in ok.stdout and "CIDEr-D" in ok.stdout
    for flags in (["--meteor", "on"], ["--tokenizer", "ptb", "--meteor", "off"]):
        bad = subprocess.run(cmd + flags, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        assert bad.returncode == 2, flags
        err_lines = bad.stderr.strip().splitlines()
        assert len(err_lines) == 1 and "java" in err_lines[0], (flags, bad.stderr)


@needs_java
def test_cli_ptb_tokenizer(tmp_path):
    out_json = tmp_path / "metrics.json"
    rc = eval_cli.main(
        [
            "--pred",
            _write_preds(tmp_path),
            "--refs",
            _ref_files(tmp_path)[0],
            "--json",
            str(out_json),
            "--meteor",
            "off",
            "--tokenizer",
            "ptb",
        ]
    )
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["tokenizer"] == "ptb"
    assert metrics.TOKENIZER_NOTES["ptb"] in report["notes"]
    for key, value in _expected().items():  # these captions tokenize alike both ways
        assert report[key] == pytest.approx(value, abs=1e-12), key


def test_tfds_references_hook(monkeypatch):
    """load_tfds_references reads iter_tfds_images(spec, data_dir, decode=False)."""
    import fastvlm_jax.data as data_pkg

    calls = []

    def iter_tfds_images(spec, data_dir=None, *, decode=True):
        calls.append((spec, data_dir, decode))
        yield np.int64(7), None, np.array([b"A dog.", b"A puppy."], dtype=object)
        yield b"img8", None, "A cat."

    # A stand-in module: the real one imports TFDS and reads a prepared dataset.
    fake = types.ModuleType("fastvlm_jax.data.tfds_builders")
    fake.iter_tfds_images = iter_tfds_images
    monkeypatch.setitem(sys.modules, "fastvlm_jax.data.tfds_builders", fake)
    monkeypatch.setattr(data_pkg, "tfds_builders", fake, raising=False)
    refs = eval_cli.load_tfds_references("tfds:coco_captions:val", "/tmp/tfds")
    assert refs == {"7": ["A dog.", "A puppy."], "img8": ["A cat."]}
    assert calls == [("tfds:coco_captions:val", "/tmp/tfds", False)]
