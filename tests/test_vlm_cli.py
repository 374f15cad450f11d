"""`septet vlm train`, `septet vqa`, `septet caption` and `septet eval --task easy-vqa`
end to end on tiny stand-ins (the easy-VQA loader is swapped for synthetic data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from vlm_fixtures import synthetic_vqa, tiny_lm_dir

from septet.cli import main
from septet.vlm import data as D

TINY = ["--steps", "2", "--stage1-steps", "1", "--warmup", "1", "--vqa-batch", "2", "--caption-batch", "2",
        "--interleaved-batch", "1", "--interleaved-images", "2", "--stage1-batch", "4", "--n-latents", "4",
        "--resampler-layers", "1", "--resampler-dim", "32", "--xattn-every", "1", "--ff-mult", "1",
        "--qformer-dim", "32", "--qformer-layers", "2", "--n-query", "2", "--eval-every", "2",
        "--eval-questions", "2", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny Flamingo and one tiny BLIP-2 run, trained through the CLI."""
    root = tmp_path_factory.mktemp("vlm-cli")
    lm = tiny_lm_dir(root)
    mp = pytest.MonkeyPatch()
    mp.setattr(D, "load_easyvqa", lambda split: synthetic_vqa(24, 0) if split == "train"
               else synthetic_vqa(12, 1, offset=100))
    out = {}
    for arch in ("flamingo", "blip2"):
        rc = main(["vlm", "train", "--arch", arch, "--lm", str(lm), "--vision", "tiny-test",
                   "--out", str(root / arch), *TINY])
        assert rc == 0
        out[arch] = root / arch
    yield out
    mp.undo()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rgb = (np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)  # odd size on purpose
    Image.fromarray(rgb).save(root / "odd.png")
    Image.fromarray(rgb).save(root / "odd.jpg", quality=90)
    (root / "notes.txt").write_text("not an image\n")
    return root


def test_train_writes_metrics_and_a_resumable_checkpoint(runs):
    for arch, run in runs.items():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == (2 if arch == "flamingo" else 3)
        assert (run / f"step-{rows[-1]['step']:08d}" / "training_state").is_dir()


@pytest.mark.parametrize("arch", ["flamingo", "blip2"])
@pytest.mark.parametrize("name", ["odd.png", "odd.jpg"])
def test_vqa_and_caption_answer_on_any_image(runs, images, capsys, arch, name):
    assert main(["vqa", "--model", str(runs[arch]), "--image", str(images / name),
                 "--question", "what color is the shape?", "--beams", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["question"] == "what color is the shape?" and isinstance(out["answer"], str)
    assert main(["vqa", "--model", str(runs[arch]), "--image", str(images / name), "--question",
                 "what color is the shape?", "--choices", "red,blue,green"]) == 0
    assert capsys.readouterr().out.strip() in ("red", "blue", "green")
    assert main(["caption", "--model", str(runs[arch]), "--image", str(images / name), "--beams", "2"]) == 0


def test_a_non_image_file_is_one_line_error(runs, images, capsys):
    rc = main(["vqa", "--model", str(runs["flamingo"]), "--image", str(images / "notes.txt"), "--question", "what?"])
    err = capsys.readouterr().err
    assert rc == 2 and "is not an image" in err and len(err.strip().splitlines()) == 1
    rc = main(["caption", "--model", str(images), "--image", str(images / "odd.png")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_eval_easy_vqa_on_a_vlm_checkpoint(runs, tmp_path, capsys):
    for arch, shots in (("flamingo", "0,2"), ("blip2", "0,2")):
        rc = main(["eval", "--model", str(runs[arch]), "--task", "easy-vqa", "--shots", shots, "--limit", "2",
                   "--out", str(tmp_path / arch), "--json"])
        assert rc == 0
        res = json.loads(capsys.readouterr().out)
        metrics = {(r["task"], r["shots"], r["metric"]) for r in res["results"]}
        assert ("easy-vqa", 0, "acc_ranked") in metrics
        assert any("majority" in t for t, _, _ in metrics) and any("text-only" in t for t, _, _ in metrics)
        if arch == "flamingo":
            assert ("easy-vqa", 2, "acc_ranked_rices") in metrics and ("easy-vqa", 2, "acc_ranked_random") in metrics
        else:
            assert not any(s == 2 for _, s, _ in metrics) and res["warnings"]


def test_easy_vqa_on_a_plain_lm_is_a_clear_error(runs, capsys):
    from septet.eval.catalog import get_task, registered_tasks

    assert "easy-vqa" in registered_tasks()
    with pytest.raises(Exception, match="vision-language checkpoint"):
        get_task("easy-vqa").evaluate(None, 0)


def test_retrieval_eval_uses_the_stage1_bridge(runs, tmp_path, capsys):
    stage1 = runs["blip2"] / "stage1"
    assert (stage1 / "config.json").is_file()  # kept by the trainer at the end of stage 1
    rc = main(["eval", "--model", str(runs["blip2"]), "--task", "easy-vqa-retrieval", "--limit", "6",
               "--out", str(tmp_path / "ret"), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    got = {r["metric"]: r for r in res["results"]}
    for tag in ("itc", "itm"):
        assert got[f"i2t_R@1_{tag}"]["n"] == 6 and 0 <= got[f"i2t_R@1_{tag}"]["value"] <= got[f"i2t_R@5_{tag}"]["value"]
        assert got[f"t2i_R@1_{tag}"]["value"] <= got[f"t2i_R@10_{tag}"]["value"] <= 1
    assert all(r["notes"]["checkpoint"] == str(stage1) for r in res["results"])
    assert main(["eval", "--model", str(runs["flamingo"]), "--task", "easy-vqa-retrieval", "--limit", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs BLIP-2's ITC / ITM heads" in err[0]
