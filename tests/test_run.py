"""decode.run end to end (in-process `main(argv)`), its input expansion and the Captioner API.

All runs share one tiny checkpoint and the same shapes (batch 4, prompt bucket 32, capacity
16), so the whole file compiles one SSD and one AR program.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decode import engine, run
from decode.engine.captioner import BatchStats, Captioner, CaptionResult, GenerationOptions, capacity_bucket, summarize
from decode.inputs import expand_inputs
from fastvlm_jax.ckpt.checkpoint import load_checkpoint
from tests.run_fixtures import make_tiny_checkpoint, write_image, write_truncated_png

REPO = Path(__file__).resolve().parents[1]
BATCH = "4"
MAX_NEW = "8"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder of good images in many modes and sizes, plus files that are not images.

    Returns (folder, good ids, bad ids) with ids as decode.run writes them.
    """
    root = tmp_path_factory.mktemp("mixed")
    folder = root / "photos"
    good = [
        write_image(folder / "rgb.png", seed=1),
        write_image(folder / "photo.JPG", seed=2),  # upper-case extension
        write_image(folder / "gray.png", mode="L", seed=3),
        write_image(folder / "rgba.png", mode="RGBA", seed=4),
        write_image(folder / "palette.gif", mode="P", seed=5),
        write_image(folder / "deep16.png", mode="I;16", seed=6),
        write_image(folder / "nested" / "inner.webp", seed=7),
    ]
    # 10000x10000: a solid grayscale PNG is ~100 KB on disk but 300 MB once decoded to RGB.
    big = folder / "huge.png"
    Image.new("L", (10000, 10000), 90).save(big)
    good.append(big)
    bad = [write_truncated_png(folder / "truncated.png")]
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    (folder / "empty.png").write_bytes(b"")
    bad += [folder / "text.jpg", folder / "empty.png"]
    # Never picked up from a folder: hidden files and folders, non-image extensions.
    write_image(folder / ".hidden.png")
    write_image(folder / ".cache" / "thumb.png")
    (folder / "notes.md").write_text("not an image")
    return folder, sorted(map(str, good)), sorted(map(str, bad))


def _read_jsonl(path):
    text = Path(path).read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _main(ckpt, images, out, *extra):
    return run.main(
        [
            "--ckpt",
            ckpt,
            "--images",
            *map(str, images),
            "--out",
            str(out),
            "--batch-size",
            BATCH,
            "--max-new-tokens",
            MAX_NEW,
            *extra,
        ]
    )


def _captions(lines):
    return {line["image"]: line for line in lines if "caption" in line}


def test_help_documents_exit_codes():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "decode.run", "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for text in ("--ckpt", "--images", "--stats", "--draft-len", "Exit status", "130", "Resuming"):
        assert text in proc.stdout


@pytest.mark.slow
def test_mixed_folder_good_captioned_bad_reported_and_rerun(ckpt, mixed, tmp_path, capsys):
    folder, good, bad = mixed
    out, stats_path = tmp_path / "out" / "captions.jsonl", tmp_path / "stats.json"
    assert _main(ckpt, [folder], out, "--stats", stats_path) == run.EXIT_SOME_FAILED
    err = capsys.readouterr().err
    lines = _read_jsonl(out)
    captions = _captions(lines)
    assert sorted(captions) == good
    assert sorted(line["image"] for line in lines if "error" in line) == bad
    assert len(lines) == len(good) + len(bad)
    for path in bad:  # one clear line per bad file, naming it
        assert sum(path in line for line in err.splitlines()) == 1
    assert "truncated" in next(line for line in lines if line["image"].endswith("truncated.png"))["error"]
    assert "empty" in next(line for line in lines if line["image"].endswith("empty.png"))["error"]
    for line in captions.values():
        assert line["mode"] == "ssd" and isinstance(line["caption"], str)
        assert len(line["token_ids"]) == line["num_tokens"] <= int(MAX_NEW)
        assert line["stop"] in ("eos", "length")

    stats = json.loads(stats_path.read_text())
    for key in (
        "images",
        "tokens",
        "seconds",
        "tokens_per_s",
        "mean_accepted_length",
        "acceptance_rate",
        "full_model_calls",
        "failed",
        "skipped_done",
        "mode",
        "device",
        "batch_size",
        "acceptance_per_position",
        "compile_seconds",
        "timing",
    ):
        assert key in stats, key
    assert stats["images"] == len(good) and stats["failed"] == len(bad) and stats["skipped_done"] == 0
    assert stats["tokens"] == sum(line["num_tokens"] for line in captions.values())
    assert stats["rounds"] == sum(line["rounds"] for line in captions.values())
    assert stats["full_model_calls"] == stats["rounds"] + stats["images"]
    assert stats["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["drafted"])
    assert stats["mean_accepted_length"] == pytest.approx((stats["tokens"] - stats["images"]) / stats["rounds"])
    # 8 images in batches of 4 plus dummy-free accounting: every proposal is counted once.
    assert sum(stats["position_attempts"]) == stats["drafted"]
    assert sum(stats["position_accepts"]) == stats["accepted"]
    assert stats["tokens_per_s"] == pytest.approx(stats["tokens"] / stats["seconds"])

    # A second run skips the captioned images and retries the failed ones (still failing).
    assert _main(ckpt, [folder], out, "--stats", stats_path) == run.EXIT_SOME_FAILED
    again = _read_jsonl(out)
    assert [line for line in again if "caption" in line] == [line for line in lines if "caption" in line]
    assert sorted(line["image"] for line in again if "error" in line) == bad  # replaced, not added
    stats = json.loads(stats_path.read_text())
    assert stats["skipped_done"] == len(good) and stats["images"] == 0 and stats["failed"] == len(bad)


def test_greedy_ssd_equals_ar(ckpt, mixed, tmp_path):
    folder, good, _ = mixed
    images = [p for p in good if "huge" not in p]  # (keep it quick)
    ssd_out, ar_out = tmp_path / "ssd.jsonl", tmp_path / "ar.jsonl"
    ar_stats = tmp_path / "ar.json"
    assert _main(ckpt, images, ssd_out) == run.EXIT_OK
    assert _main(ckpt, images, ar_out, "--mode", "ar", "--stats", ar_stats) == run.EXIT_OK
    ssd, ar = _captions(_read_jsonl(ssd_out)), _captions(_read_jsonl(ar_out))
    assert sorted(ssd) == sorted(ar) == sorted(images)
    for image in images:
        assert ssd[image]["token_ids"] == ar[image]["token_ids"]
        assert ssd[image]["caption"] == ar[image]["caption"]
    assert sum(line["rounds"] for line in ssd.values()) < sum(line["rounds"] for line in ar.values())
    stats = json.loads(ar_stats.read_text())
    assert stats["mean_accepted_length"] == 1.0 and stats["acceptance_rate"] is None


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_killed_run_resumes_without_duplicates_or_losses(ckpt, tmp_path, monkeypatch, capsys, batching):
    images = [write_image(tmp_path / "in" / f"{i:02d}.png", seed=i) for i in range(10)]
    ids = sorted(str(p) for p in images)
    reference = tmp_path / "reference.jsonl"
    assert _main(ckpt, [tmp_path / "in"], reference, "--batching", "static") == run.EXIT_OK
    expected = _captions(_read_jsonl(reference))

    # 1. Interrupted (Ctrl-C) mid-run: static, during the third batch (two batches are on
    # disk); continuous, as the fifth caption finishes (four are on disk).
    calls = {"n": 0}
    method = "generate_batch" if batching == "static" else "result_of"
    original = getattr(Captioner, method)
    stop_at, written = (3, 8) if batching == "static" else (5, 4)

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Captioner, method, flaky)
    out = tmp_path / "out.jsonl"
    assert _main(ckpt, [tmp_path / "in"], out, "--batching", batching) == run.EXIT_INTERRUPTED
    assert len(_read_jsonl(out)) == written
    monkeypatch.setattr(Captioner, method, original)
    assert _main(ckpt, [tmp_path / "in"], out, "--batching", batching) == run.EXIT_OK
    lines = _read_jsonl(out)
    # Each exactly once (static: in input order; continuous: as they finished).
    got = [line["image"] for line in lines]
    assert (got if batching == "static" else sorted(got)) == ids
    assert _captions(lines) == expected

    # 2. Killed while writing: the last line is cut short (and one image never started).
    text = reference.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = "".join(text[:6]) + text[6][: len(text[6]) // 2]
    out.write_text(cut, encoding="utf-8")
    capsys.readouterr()
    assert _main(ckpt, [tmp_path / "in"], out) == run.EXIT_OK
    assert "dropping 1 unreadable line" in capsys.readouterr().err
    lines = _read_jsonl(out)
    assert sorted(line["image"] for line in lines) == ids
    assert _captions(lines) == expected

    # 3. Everything done: nothing to do, exit 0, file untouched.
    before = out.read_bytes()
    assert _main(ckpt, [tmp_path / "in"], out) == run.EXIT_OK
    assert out.read_bytes() == before


def test_list_files_globs_and_folders(ckpt, tmp_path, capsys):
    data = tmp_path / "data"
    a = write_image(data / "a" / "one.png", seed=1)
    b = write_image(data / "a" / "deeper" / "two.JPEG", seed=2)
    c = write_image(data / "b" / "three.bmp", seed=3)
    d = write_image(data / "b" / "four.png", seed=4)
    write_image(data / "a" / ".secret.png")
    os.symlink("..", data / "a" / "deeper" / "cycle")  # a link cycle must not hang the walk
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "images.txt"
    listing.write_text(
        "# images to caption\n\n../data/b/three.bmp\n  ../data/a/one.png  \n../data/missing.png\n" + str(d) + "\n"
    )

    items, errors = expand_inputs([str(listing)])
    assert [item.id for item in items] == [
        os.path.normpath(str(lists / "../data/b/three.bmp")),
        os.path.normpath(str(lists / "../data/a/one.png")),
        str(d),
    ]
    assert len(errors) == 1 and "missing.png" in errors[0].spec and "images.txt:5" in errors[0].message

    items, errors = expand_inputs([str(data / "a"), str(data / "**" / "*.png"), str(a)])
    # Folder: recursive, sorted, hidden skipped, upper-case extension kept; then the glob adds
    # only new ids; the repeated file is kept once.
    assert [item.id for item in items] == [str(b), str(a), str(d)]
    assert not errors

    items, errors = expand_inputs([str(data / "*.nothing"), str(tmp_path / "nope"), str(tmp_path / "lists")])
    assert not items and [e.spec for e in errors] == [
        str(data / "*.nothing"),
        str(tmp_path / "nope"),
        str(tmp_path / "lists"),
    ]

    out = tmp_path / "out.jsonl"
    assert _main(ckpt, [listing, str(data / "a" / "*")], out) == run.EXIT_SOME_FAILED
    lines = _read_jsonl(out)
    assert sorted(_captions(lines)) == sorted(os.path.normpath(str(p)) for p in (a, b, c, d))
    assert [line["image"] for line in lines if "error" in line] == [
        os.path.normpath(str(lists / "../data/missing.png"))
    ]
    assert "missing.png" in capsys.readouterr().err


def test_usage_errors_exit_2_with_one_line(ckpt, mixed, tmp_path, capsys):
    folder, good, bad = mixed
    out = tmp_path / "out.jsonl"

    def error_line(argv):
        assert run.main(argv) == run.EXIT_USAGE
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and err[-1].startswith("python -m decode.run: error:")
        return err[-1]

    base = ["--images", good[0], "--out", str(out)]
    assert "--bogus" in error_line(["--ckpt", ckpt, *base, "--bogus"])
    assert "no such folder" in error_line(["--ckpt", str(tmp_path / "nope"), *base])
    assert "did you mean" in error_line(["--ckpt", str(Path(ckpt).parent), *base])
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    (hf / "model.safetensors").write_bytes(b"")
    assert "fastvlm_jax.convert" in error_line(["--ckpt", str(hf), *base])
    assert "--batch-size" in error_line(["--ckpt", ckpt, *base, "--batch-size", "0"])
    assert "no images found" in error_line(["--ckpt", ckpt, "--images", str(tmp_path / "none*.png"), "--out", str(out)])
    # Every image fails: nothing could be captioned.
    assert _main(ckpt, bad, out) == run.EXIT_USAGE
    assert not out.exists() or all("error" in line for line in _read_jsonl(out))


def test_captioner_api_sources_buckets_and_stats(ckpt):
    checkpoint = load_checkpoint(ckpt)
    captioner = Captioner(checkpoint, batch_size=4)
    rng = np.random.RandomState(0)
    array = rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)
    pil = Image.fromarray(array)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    images = [pil, buffer.getvalue(), array, pil, pil, array]  # 6 images: batches of 4 and 2
    results = captioner.caption(images, max_new_tokens=8)
    programs = engine.compiled_programs()
    assert len(results) == 6 and all(isinstance(r, CaptionResult) for r in results)
    # The same pixels give the same caption, whatever the source type or batch position.
    assert len({r.token_ids for r in results}) == 1
    # A different budget under the same capacity bucket reuses the compiled program.
    assert capacity_bucket(5) == capacity_bucket(8) == 16 and capacity_bucket(17) == 32
    short = captioner.caption(images[:3], max_new_tokens=5)
    assert [r.token_ids for r in short] == [results[0].token_ids[:5]] * 3
    assert engine.compiled_programs() == programs

    batches = list(captioner.caption_batches(images[:3], options=GenerationOptions(max_new_tokens=8)))
    assert len(batches) == 1 and batches[0].stats.images == 3  # dummy row excluded
    total = sum((b.stats for b in batches), BatchStats())
    summary = summarize(total)
    assert summary["tokens"] == sum(r.num_tokens for r in batches[0].results)
    assert sum(total.position_attempts) == total.drafted
    assert summary["full_model_calls"] == total.rounds + 3


def test_tfds_images(ckpt, tmp_path):
    from fastvlm_jax.data import tfds_builders

    data_dir = str(tmp_path / "tfds")
    builder = tfds_builders.build_dataset(
        "synthetic_captions", data_dir, num_train=1, num_validation=1, num_test=3, image_size=16
    )
    spec = f"tfds:synthetic_captions/{builder.builder_config.name}:test"
    items, errors = expand_inputs([spec], data_dir)
    assert not errors and len(items) == 3
    assert all(item.id.startswith(spec + "/") for item in items)
    out = tmp_path / "out.jsonl"
    assert _main(ckpt, [spec], out, "--data-dir", data_dir) == run.EXIT_OK
    assert sorted(_captions(_read_jsonl(out))) == sorted(item.id for item in items)
    items, errors = expand_inputs(["tfds:no_such_dataset:test"], data_dir)
    assert not items and "cannot read TFDS images" in errors[0].message


def test_continuous_batching_stats(ckpt, tmp_path):
    """--batching continuous (the default) reports its slots: utilization, inserts, prefill share."""
    images = [write_image(tmp_path / "in" / f"{i:02d}.png", seed=i) for i in range(5)]
    stats_file = tmp_path / "stats.json"
    assert _main(ckpt, images, tmp_path / "out.jsonl", "--stats", stats_file) == run.EXIT_OK
    stats = json.loads(stats_file.read_text())
    assert stats["batching"] == "continuous" and stats["images"] == 5 and stats["inserts"] == 5
    assert 0 < stats["slot_utilization"] <= 1 and 0 < stats["prefill_share"] < 1
    assert stats["prefills"] >= -(-5 // int(BATCH))


@pytest.mark.slow
def test_sampled_captions_do_not_depend_on_batch_size_or_a_resume(ckpt, tmp_path, monkeypatch):
    """--temperature 1 with continuous batching: each image samples from its own key, so the
    captions are the same at batch 4 and 16, and after an interrupted run is resumed at 8."""
    images = [write_image(tmp_path / "in" / f"{i:02d}.png", seed=i) for i in range(9)]
    sampled = ("--temperature", "1.0", "--seed", "7")

    def captions(out, batch):
        assert _main(ckpt, images, out, *sampled, "--batch-size", batch) == run.EXIT_OK
        return {line["image"]: line["token_ids"] for line in _read_jsonl(out)}

    at4 = captions(tmp_path / "b4.jsonl", "4")
    assert captions(tmp_path / "b16.jsonl", "16") == at4
    assert len({tuple(t) for t in at4.values()}) > 1  # sampled, not one caption for all
    calls = {"n": 0}
    original = Captioner.result_of

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Captioner, "result_of", flaky)
    out = tmp_path / "resumed.jsonl"
    assert _main(ckpt, images, out, *sampled, "--batch-size", "4") == run.EXIT_INTERRUPTED
    monkeypatch.setattr(Captioner, "result_of", original)
    assert captions(out, "8") == at4
