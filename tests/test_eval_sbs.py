"""Side-by-side: blinded export, aggregation against hand-computed values, agreement on real data, the HTML page."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation import sbs
from evaluation.stats import fleiss_kappa, krippendorff_alpha_nominal, wilson_interval

from conftest import SHARED


def make_pairs(tmp_path: Path, n: int = 10) -> list[sbs.Pair]:
    pairs = []
    for i in range(n):
        for model, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
            (tmp_path / model).mkdir(exist_ok=True)
            Image.new("RGB", (32, 32), colour).save(tmp_path / model / f"{i}.png")
        pairs.append(
            sbs.Pair(
                f"p{i}", f"prompt {i}", "cat" + str(i % 2), 0, tmp_path / "a" / f"{i}.png", tmp_path / "b" / f"{i}.png"
            )
        )
    return pairs


def test_export_is_blinded_and_reproducible(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path)
    out = sbs.export(pairs, tmp_path / "pkg", "model-a", "model-b", seed=3, repeat_fraction=0.2)
    items = json.loads(out["items"].read_text())
    key = json.loads(out["key"].read_text())
    assert len(items) == 12 and out["key"].parent == tmp_path  # 10 + 2 repeats; key kept outside the package
    shared = "".join(p.read_text() for p in (tmp_path / "pkg").rglob("*") if p.suffix in (".json", ".html"))
    assert "model-a" not in shared and "model-b" not in shared and "p3" not in shared
    lefts = [key["items"][it["item_id"]]["left"] for it in items]
    assert 0 < lefts.count("model-a") < 12  # (sides: test_sides_are_a_fair_coin_per_item_and_seed)
    repeats = [k for k, v in key["items"].items() if v["repeat_of"]]
    assert len(repeats) == 2
    for r in repeats:
        orig = key["items"][key["items"][r]["repeat_of"]]
        assert orig["left"] == key["items"][r]["right"]  # the repeat swaps the sides
    red = np.asarray(Image.open(tmp_path / "pkg" / items[0]["left"]))[0, 0]
    assert (red[0] > red[2]) == (lefts[0] == "model-a")  # image files follow the key
    again = sbs.export(pairs, tmp_path / "pkg2", "model-a", "model-b", seed=3, repeat_fraction=0.2)
    assert json.loads(again["key"].read_text())["items"] == key["items"]


def write_key(path: Path) -> Path:
    key = {
        "model_a": "A",
        "model_b": "B",
        "seed": 0,
        "items": {
            "i1": {"prompt_id": "p1", "category": "x", "seed": 0, "left": "A", "right": "B", "repeat_of": None},
            "i2": {"prompt_id": "p2", "category": "x", "seed": 0, "left": "B", "right": "A", "repeat_of": None},
            "i3": {"prompt_id": "p3", "category": "y", "seed": 0, "left": "A", "right": "B", "repeat_of": None},
            "i4": {"prompt_id": "p1", "category": "x", "seed": 0, "left": "B", "right": "A", "repeat_of": "i1"},
        },
    }
    path.write_text(json.dumps(key))
    return path


ROWS = [
    ("i1", "r1", "left"),
    ("i2", "r1", "left"),
    ("i3", "r1", "tie"),
    ("i4", "r1", "right"),
    ("i1", "r2", "left"),
    ("i2", "r2", "right"),
    ("i3", "r2", "left"),
]


def write_annotations(path: Path, rows: list[tuple[str, str, str]], question: str = "alignment") -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "annotator_id", "question", "choice"])
        for item, rater, choice in rows:
            w.writerow([item, rater, question, choice])
    return path


def test_aggregation_matches_hand_computed_values(tmp_path: Path) -> None:
    report = sbs.ingest(
        write_annotations(tmp_path / "ann.csv", ROWS), write_key(tmp_path / "key.json"), bootstrap_samples=500
    )
    res = report["questions"]["alignment"]
    o = res["overall"]
    # r1: i1 A, i2 B, i3 tie; r2: i1 A, i2 A, i3 A  -> W 4, T 1, L 1 (the repeat i4 only feeds consistency)
    assert (o["wins"], o["ties"], o["losses"]) == (4, 1, 1)
    assert o["win_rate_ties_half"] == pytest.approx(4.5 / 6) and o["win_rate_no_ties"] == pytest.approx(0.8)
    assert o["wilson95_ties_half"] == pytest.approx((0.3648, 0.9400), abs=1e-3)  # by hand, z = 1.96
    assert o["wilson95_no_ties"] == pytest.approx(wilson_interval(4, 5))
    lo, hi = o["bootstrap95_ties_half"]
    assert lo < 0.75 < hi  # (its coverage: test_the_prompt_bootstrap_covers_at_its_nominal_rate)
    assert (res["by_category"]["x"]["wins"], res["by_category"]["x"]["losses"]) == (3, 1)
    assert (res["by_category"]["y"]["wins"], res["by_category"]["y"]["ties"]) == (1, 1)
    assert res["consistency"] == {"pairs": 1, "consistent": 1, "rate": 1.0}
    assert report["questions"]["quality"]["overall"]["n"] == 0
    files = sbs.write_report(report, tmp_path / "report")
    assert files["plot"].stat().st_size > 1000 and "| all | 4 | 1 | 1 | 0.750 |" in files["markdown"].read_text()


def test_sides_are_a_fair_coin_per_item_and_seed(tmp_path: Path) -> None:
    """Which model is shown left is a fair coin per item (binomial test over 5 seeds x 200 items), and another seed
    draws other sides (half of the items change, binomial test): no fixed or alternating pattern a rater could learn."""
    from scipy.stats import binomtest

    pairs = make_pairs(tmp_path, n=200)
    sides = []
    for seed in range(5):
        out = sbs.export(pairs, tmp_path / f"pkg{seed}", "model-a", "model-b", seed=seed, repeat_fraction=0.0)
        key = json.loads(out["key"].read_text())["items"]
        sides.append({v["prompt_id"]: v["left"] == "model-a" for v in key.values()})
    lefts = sum(sum(s.values()) for s in sides)
    assert binomtest(lefts, 5 * 200, 0.5).pvalue > 0.001, lefts
    changed = sum(sides[0][k] != sides[1][k] for k in sides[0])
    assert binomtest(changed, 200, 0.5).pvalue > 0.001, changed


def test_the_prompt_bootstrap_covers_at_its_nominal_rate() -> None:
    """The bootstrap 95% interval of the win rate (prompts resampled whole) covers the true rate in about 95% of
    simulated studies: 400 seeded studies of 60 prompts x 3 votes, prompt win rates drawn from Beta(3, 2) (mean 0.6).
    A percentile bootstrap runs a little under its nominal rate at this size: 0.91-0.98 is asserted."""
    from evaluation.stats import bootstrap_interval

    rng = np.random.default_rng(0)
    covered = 0
    for study in range(400):
        rates = rng.beta(3, 2, size=60)
        groups = [rng.binomial(1, r, size=3).astype(float).tolist() for r in rates]
        lo, hi = bootstrap_interval(groups, num_samples=1000, seed=study)
        covered += lo <= 0.6 <= hi
    assert 0.91 <= covered / 400 <= 0.98, covered / 400


def test_bad_annotations_name_row_and_value(tmp_path: Path) -> None:
    key = write_key(tmp_path / "key.json")
    with pytest.raises(ValueError, match=r"row 2: unknown item id 'zz'"):
        sbs.ingest(write_annotations(tmp_path / "a.csv", [("i1", "r", "left"), ("zz", "r", "left")]), key)
    with pytest.raises(ValueError, match=r"row 1: invalid choice 'both'"):
        sbs.ingest(write_annotations(tmp_path / "b.csv", [("i1", "r", "both")]), key)


def test_agreement_statistics() -> None:
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"], ["a", "a", "a"]]) == pytest.approx(1.0)
    # Krippendorff's own nominal example (2004, 4 coders with missing values): alpha = 0.743
    data = [
        [1, 1, None, 1],
        [2, 2, 3, 2],
        [3, 3, 3, 3],
        [3, 3, 3, 3],
        [2, 2, 2, 2],
        [1, 2, 3, 4],
        [4, 4, 4, 4],
        [1, 1, 2, 1],
        [2, 2, 2, 2],
        [None, 5, 5, 5],
        [None, None, 1, 1],
        [None, None, 3, None],
    ]
    assert krippendorff_alpha_nominal(data) == pytest.approx(0.743, abs=1e-3)
    # Fleiss (1971)-style check: perfect agreement is 1, and kappa is below 1 with disagreement
    assert fleiss_kappa([["a", "a", "a"], ["b", "b", "b"]]) == pytest.approx(1.0)
    assert fleiss_kappa([["a", "a", "b"], ["b", "b", "a"], ["a", "a", "a"]]) < 1.0


def test_agreement_is_undefined_when_every_rating_is_equal() -> None:
    import krippendorff  # the reference package (a test dependency)

    same = [["left", "left"], ["left", "left", "left"]]
    with pytest.raises(ValueError, match="more than one value"):
        krippendorff.alpha(reliability_data=[[0, 0, np.nan], [0, 0, 0]], level_of_measurement="nominal")
    assert np.isnan(krippendorff_alpha_nominal(same)) and np.isnan(fleiss_kappa([["a", "a"], ["a", "a"]]))
    assert np.isnan(krippendorff_alpha_nominal([["a"], ["b"]]))  # no item rated twice
    # elsewhere it equals the reference package on random data with missing ratings
    rng = np.random.default_rng(0)
    for _ in range(5):
        data = rng.integers(0, 3, size=(4, 30)).astype(float)
        data[rng.random(data.shape) < 0.2] = np.nan
        units = [[None if np.isnan(v) else int(v) for v in data[:, j]] for j in range(data.shape[1])]
        assert krippendorff_alpha_nominal(units) == pytest.approx(
            krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
        )


def test_report_says_alpha_is_undefined(tmp_path: Path) -> None:
    rows = [
        ("i1", "r1", "left"),
        ("i1", "r2", "left"),
        ("i3", "r1", "left"),
        ("i3", "r2", "left"),
    ]  # every vote: A wins
    report = sbs.ingest(
        write_annotations(tmp_path / "ann.csv", rows), write_key(tmp_path / "key.json"), bootstrap_samples=50
    )
    assert np.isnan(report["questions"]["alignment"]["agreement_krippendorff_alpha"])
    files = sbs.write_report(report, tmp_path / "report")
    assert (
        "Krippendorff's alpha: undefined" in files["markdown"].read_text()
        and "alpha: undefined" in files["html"].read_text()
    )
    assert (
        json.loads(files["json"].read_text())["questions"]["alignment"]["agreement_krippendorff_alpha"] is None
    )  # strict JSON


@pytest.mark.skipif(
    not (SHARED / "prompt-sets").is_dir(),
    reason="the public prompt sets are not beside the checkout (set K3LAB_SHARED)",
)
def test_agreement_on_real_geneval_annotations() -> None:
    import krippendorff

    path = SHARED / "prompt-sets" / "geneval" / "annotations_sdv2.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    units: dict[str, list[str]] = {}
    for r in rows:
        units.setdefault(r["Input.index"], []).append(r["Answer.task-quality"])
    alpha = krippendorff_alpha_nominal(units.values())
    # the reference package on the same data (values coded as integers, one column per item, raters padded with NaN)
    codes = {v: i for i, v in enumerate(sorted({v for vs in units.values() for v in vs}))}
    width = max(len(v) for v in units.values())
    table = np.full((width, len(units)), np.nan)
    for j, values in enumerate(units.values()):
        table[: len(values), j] = [codes[v] for v in values]
    assert len(rows) == 2000 and alpha == pytest.approx(
        krippendorff.alpha(reliability_data=table, level_of_measurement="nominal")
    )


def chromium(tmp_path: Path):
    """Debian's headless chromium through selenium (.ci/run and ``make test`` install chromium + chromium-driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver_path, "Debian's chromium and chromium-driver are required (.ci/run installs them)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def test_html_records_a_key_press_in_headless_chromium(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    out = sbs.export(make_pairs(tmp_path, 3), tmp_path / "pkg", "A", "B", seed=0, repeat_fraction=0.0)
    driver = chromium(tmp_path)
    try:
        driver.get(out["html"].resolve().as_uri())
        box = driver.find_element(By.ID, "annotator")
        box.send_keys("rater-1", Keys.ENTER)
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.ARROW_LEFT)
        body.send_keys("3")
        rows = driver.execute_script("return window.k3labAnnotations();")
        first_item = json.loads(out["items"].read_text())[0]["item_id"]
        assert rows == [
            {"item_id": first_item, "annotator_id": "rater-1", "question": "alignment", "choice": "left"},
            {"item_id": first_item, "annotator_id": "rater-1", "question": "quality", "choice": "tie"},
        ]
        assert "item 2 of 3" in driver.find_element(By.ID, "progress").text
    finally:
        driver.quit()


PWN = "window.k3labPwned = (window.k3labPwned || []).concat"
HOSTILE = [
    f'</script><script>document.title = "pwned"; {PWN}(["script"]);</script>',
    f"\"'><img src=x onerror='{PWN}([\"img\"])'>",
    "&lt;b&gt; &amp; &quot;not bold&quot; <b>bold?</b> &#x3C;script&#x3E;",
    "<!-- <script> a comment opener, then a placeholder: /*QUESTIONS*/[] /*ITEMS*/[]",
    "\u202egnp.exe right-to-left override, \u05e9\u05dc\u05d5\u05dd \u0639\u0627\u0644\u0645 mixed direction",
    "zero\u200bwidth\u200djoiner\ufeffbom and line\u2028separator\u2029paragraph ${template} \\ back\\slash",
    "a very long prompt " + "x" * 4000 + " </script><script>" + PWN + "(['long'])</script> " + "y" * 6000,
]


def test_hostile_prompts_stay_text_in_the_page_and_the_report(tmp_path: Path) -> None:
    """Third-party (and red-teaming) prompts, model names and categories are shown as text in the real browser,
    run no script of theirs, and the page still records key presses; sbs-ingest's report escapes them too."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    pairs = [
        sbs.Pair(p.prompt_id, text, HOSTILE[i - 1] if i else "plain", 0, p.image_a, p.image_b)
        for i, (p, text) in enumerate(zip(make_pairs(tmp_path, len(HOSTILE)), HOSTILE, strict=False))
    ]
    model_a, model_b = f"<img src=x onerror='{PWN}([\"model\"])'>$x^2$", "B & <i>b</i>"
    out = sbs.export(pairs, tmp_path / "pkg", model_a, model_b, seed=0, repeat_fraction=0.0)
    items = json.loads(out["items"].read_text(encoding="utf-8"))
    assert sorted(it["prompt"] for it in items) == sorted(HOSTILE)
    page = out["html"].read_text(encoding="utf-8")
    assert (
        page.count("</script>") == 1 and "<!--" not in page and "\u2028" not in page
    )  # one script element, closed once
    driver = chromium(tmp_path)
    try:
        driver.get(out["html"].resolve().as_uri())
        assert driver.execute_script("return ITEMS;") == items  # the embedded data is the same JSON, unchanged
        driver.find_element(By.ID, "annotator").send_keys('rater "1", <b>', Keys.ENTER)
        body = driver.find_element(By.TAG_NAME, "body")
        for k, item in enumerate(items):
            shown = driver.execute_script("return document.getElementById('prompt').textContent;")
            assert shown == item["prompt"], f"item {k}: the page shows {shown[:80]!r}"
            assert not driver.find_elements(By.CSS_SELECTOR, "#prompt *")  # text, never markup
            body.send_keys(Keys.ARROW_LEFT if k % 2 else Keys.ARROW_RIGHT)
            body.send_keys("t")
        rows = driver.execute_script("return window.k3labAnnotations();")
        assert len(rows) == 2 * len(items) and [r["item_id"] for r in rows[::2]] == [it["item_id"] for it in items]
        assert driver.title == "Side-by-side annotation" and driver.execute_script("return window.k3labPwned;") is None
        assert driver.find_element(By.ID, "done").is_displayed()

        annotations = tmp_path / "annotations.json"
        annotations.write_text(json.dumps(rows))
        report = sbs.ingest(annotations, out["key"], bootstrap_samples=100)
        files = sbs.write_report(report, tmp_path / "report")
        driver.get(files["html"].resolve().as_uri())
        text = driver.find_element(By.TAG_NAME, "body").text
        assert driver.title == "SBS report" and driver.execute_script("return window.k3labPwned;") is None
        assert f"{model_a} vs {model_b}" in text and "&lt;b&gt; &amp; &quot;not bold&quot;" in text
        assert not driver.find_elements(By.CSS_SELECTOR, "body img:not([alt='win rates']), body i, body b, body script")
        rows_shown = driver.find_elements(By.CSS_SELECTOR, "table tr")
        assert len(rows_shown) == 2 * (1 + 1 + len(HOSTILE))  # per question: header, all, one row per category
    finally:
        driver.quit()
    md = files["markdown"].read_text(encoding="utf-8")
    assert "<script>" not in md and "<img" not in md and "&lt;/script&gt;" in md
    assert all(
        line.count(" | ") == len(sbs.HEADER) - 1
        for line in md.splitlines()
        if line.startswith("| ") and "---" not in line
    )
