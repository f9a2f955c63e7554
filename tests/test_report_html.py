"""The HTML report of a real (small) job: self-contained, figures and example images that
decode, and — where Chromium is installed — every image loaded in a real headless browser."""
import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import config, report
from pipeline.io import shards
from pipeline.run.worker import ShardWorker
from tests.conftest import job_dict
from tests.test_report_runs import _commit_run

pytest.importorskip("matplotlib")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IMG = re.compile(r"<img alt='([^']*)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>")
# counts the images the browser decoded and puts the count in the title, which --dump-dom prints
PROBE = ("<script>window.addEventListener('load',()=>{const a=Array.from(document.images);"
         "const ok=a.filter(i=>i.complete&&i.naturalWidth>0).length;document.title='IMAGES '+ok+'/'+a.length;});"
         "</script>")


@pytest.fixture(scope="module")
def job(digits_shards, digits_models, tmp_path_factory):
    """Evaluate two shards (three attacks, R = 2), then attack and purify one shard, so the
    run has records, adversarial and purified image shards."""
    out = tmp_path_factory.mktemp("html") / "run"
    attacks = [{"name": "pgd", "params": {"eps": 0.1, "steps": 4, "step_size": 0.03}},
               {"name": "pgd", "params": {"eps": 0.2, "steps": 4, "step_size": 0.06}},
               {"name": "pgd", "params": {"eps": 0.2, "steps": 4, "step_size": 0.06}, "gradient": "classifier"}]
    cfg = job_dict(digits_shards["pattern"], digits_models, str(out), attacks=attacks, evaluation={"runs": 2})
    worker = ShardWorker(config.from_dict(cfg).to_dict())
    urls = shards.expand(digits_shards["pattern"])
    for i in range(2):
        worker.process(urls[i], f"shard-{i:06d}", "evaluate")
    worker.process(urls[0], "shard-000000", "attack")
    worker.process(str(out / "adversarial" / "shard-000000-a0.tar"), "shard-000000-a0", "purify")
    return str(out)


def _images(page: str) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    for alt, data in IMG.findall(page):
        found.setdefault(alt, []).append(base64.b64decode(data))
    return found


def test_page_is_self_contained_with_figures_and_examples(job):
    from PIL import Image

    page = report.render([job], "html", examples=6)
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page and "https://" not in page
    assert page.count("<img ") == sum(len(v) for v in _images(page).values())   # every image embedded
    found = _images(page)
    for title in ("Robust accuracy vs ε", "Robust accuracy vs attack step",
                  "Accuracy vs number of purification runs", "Per-class accuracy"):
        assert len(found[title]) == 1, title
    assert "Robust accuracy vs EOT draws: not shown" in page       # the job has one EOT setting
    assert len(found["clean"]) == len(found["adversarial"]) == len(found["purified"]) == 6
    for blobs in found.values():
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as im:
                assert im.format == "PNG" and im.width > 0
    doc = report.summarize_run(job)
    assert doc["config_hash"] in page and doc["models"]["classifier_sha256"] in page and "report versions" in page


def test_comparison_page_and_no_images_note(tmp_path):
    a = _commit_run(tmp_path / "a", {0: set(range(20))})
    b = _commit_run(tmp_path / "b", {0: set(range(10, 35))})
    page = report.render([a, b], "html")
    assert len(_images(page)["Runs compared"]) == 1
    assert "Paired comparison on the same samples" in page
    # the source shards of these hand-made records do not exist: the page says so, no traceback
    assert "example images unavailable: ShardError: /data/shard-0.tar: shard not found" in page


@pytest.fixture(scope="module")
def evaluate_only(digits_shards, digits_models, tmp_path_factory):
    """The demo's kind of job: the evaluate stage alone (two attacks at one ε), which writes
    no image shards, over two shards."""
    out = tmp_path_factory.mktemp("html_eval") / "run"
    attacks = [{"name": "pgd", "params": {"eps": 0.2, "steps": 3, "step_size": 0.08}},
               {"name": "fgsm", "params": {"eps": 0.2}}]
    cfg = job_dict(digits_shards["pattern"], digits_models, str(out), attacks=attacks)
    worker = ShardWorker(config.from_dict(cfg).to_dict())
    for i, url in enumerate(shards.expand(digits_shards["pattern"])[:2]):
        worker.process(url, f"shard-{i:06d}", "evaluate")
    return str(out)


def test_evaluate_only_job_shows_clean_examples_from_each_shard(evaluate_only):
    page = report.render([evaluate_only], "html", examples=6)
    found = _images(page)
    assert len(found["clean"]) == 6 and "adversarial" not in found
    assert "shards shard-000000, shard-000001: clean images with the worst case over every attack" in page
    assert "<br>robust</td>" in page and "<br>broken</td>" in page   # by the worst case, not attack 0's
    assert len(_images(page)["Robust accuracy vs ε"]) == 1


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs Debian's chromium)")
def test_page_renders_in_headless_chromium(job, evaluate_only, tmp_path):
    page = report.render([job], "html", examples=4)
    path = Path(tmp_path / "report.html")
    path.write_text(page.replace("</body>", PROBE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
           "--virtual-time-budget=10000", "--dump-dom", path.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>IMAGES (\d+)/(\d+)</title>", out.stdout)
    assert title, f"no probe title in the DOM: {out.stderr[-2000:]}"
    loaded, total = map(int, title.groups())
    assert total == page.count("<img ") >= 4 + 3 * 4
    assert loaded == total
    shots = os.environ.get("ADVPURE_REPORT_SHOTS")   # screenshots to look at (the closing note's evidence)
    if shots:
        for name, run in (("multi_eps", job), ("evaluate_only", evaluate_only)):
            (Path(shots) / f"{name}.html").write_text(report.render([run], "html", examples=6))
            subprocess.run([*cmd[:-2], "--window-size=1280,6000", f"--screenshot={Path(shots) / name}.png",
                            (Path(shots) / f"{name}.html").as_uri()], capture_output=True, timeout=120)
