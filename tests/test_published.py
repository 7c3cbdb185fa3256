"""The catalogue of published numbers (rayexperts/published/results.csv) and its loader.

The spot checks embed, per table, the text of the paper around one number (copied from the seed text in
/work/shared/seeds) and assert the catalogue's value for that row is printed there; where the shared folder
sits beside the repository, they also assert the snippet is in the seed file, and every row that cites a seed
line is checked against that line. Without the shared folder those file checks are skipped.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from rayexperts import published
from rayexperts.published import CATALOG, COLUMNS, METRICS, OPTIONAL_COLUMNS, check, load

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SEEDS = SHARED / "seeds"
METHODS_MD = SHARED / "docs" / "docs/methods.md"
PRESETS = REPO / "rayexperts" / "presets"

# Presets being added in this release (LDAM-DRW, RIDE, SADE, BalPoE): the catalogue may name them before their
# YAML files land. Every other preset it names must exist as rayexperts/presets/<name>.yaml.
PRESETS_BEING_ADDED = frozenset(
    [f"cifar{c}_lt_if{f}_{m}" for c in (10, 100) for f in (100, 50) for m in ("ldam_drw", "ride", "sade", "balpoe")]
    + ["cifar100_lt_if10_sade", "imagenet_lt_rx50_sade", "imagenet_lt_r50_ride", "imagenet_lt_rx50_ride"]
)

KEY = ["paper", "table", "dataset", "imbalance_factor", "backbone", "method", "variant", "metric"]


def raw_rows() -> list[dict[str, str]]:
    with CATALOG.open(newline="") as f:
        return list(csv.DictReader(f))


def norm(text: str) -> str:
    return " ".join(text.split())


def printed(value: str, text: str) -> bool:
    """``value`` (as printed, e.g. 50.60) occurs in ``text`` as a whole number, not inside a longer one."""
    return re.search(r"(?<![\d.])" + re.escape(value) + r"(?![\d])", text) is not None


def seed_file(prefix: str) -> Path:
    (path,) = SEEDS.glob(f"{prefix}_*.txt")
    return path


# -- the file ----------------------------------------------------------------------------------------------


def test_the_catalogue_is_package_data_with_the_columns_in_order():
    assert CATALOG == REPO / "rayexperts" / "published" / "results.csv"
    with CATALOG.open(newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == (*COLUMNS, *OPTIONAL_COLUMNS)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'rayexperts = \[[^\]]*"published/\*\.csv"', pyproject), "results.csv is not package data"


def test_the_catalogue_passes_check_and_loads_with_dtypes():
    check(pd.read_csv(CATALOG, dtype=str, keep_default_na=False))
    df = load()
    check(df)
    assert list(df.columns) == [*COLUMNS, *OPTIONAL_COLUMNS]
    assert len(df) == len(raw_rows()) > 900
    for col in ("imbalance_factor", "epochs", "seeds"):
        assert str(df[col].dtype) == "Int64", col
    assert df["value"].dtype == float
    assert set(df["paper"]) == {"MLLT", "NCL", "ECL", "CBD", "SADE", "RIDE"}
    assert set(df["metric"]) <= set(METRICS)


def test_no_row_is_listed_twice():
    keys = [tuple(r[k] for k in KEY) for r in raw_rows()]
    dups = sorted({k for k in keys if keys.count(k) > 1})
    assert not dups, dups[:5]


def test_values_keep_the_printed_decimals():
    rows = raw_rows()
    assert all(re.fullmatch(r"\d+\.\d+", r["value"]) for r in rows), [r["value"] for r in rows if "." not in r["value"]]
    bsce = [r for r in rows if r["paper"] == "NCL" and r["table"] == "Table 4" and r["method"] == "BSCE (baseline)"]
    assert sorted(r["value"] for r in bsce) == ["45.88", "50.60"]


def test_cifar_rows_and_only_they_carry_an_imbalance_factor():
    for i, r in enumerate(raw_rows(), start=2):
        cifar = r["dataset"] in ("cifar10-lt", "cifar100-lt")
        assert bool(r["imbalance_factor"]) == cifar, f"line {i}: {r}"
        if cifar:
            assert r["imbalance_factor"] in ("10", "50", "100", "200"), f"line {i}"


def test_selection_follows_each_paper():
    df = load()
    ncl_own = df[(df.paper == "NCL") & df.method.isin(["NCL", "BSCE (baseline)", "CE"])]
    assert set(ncl_own.selection) == {"best_test"}
    cbd_own = df[(df.paper == "CBD") & df.method.isin(["CBD", "CBD_ENS"])]
    assert set(cbd_own.selection) == {"last"}
    assert set(df[df.paper.isin(["MLLT", "ECL", "SADE", "RIDE"])].selection) == {""}
    quoted = df[(df.paper == "NCL") & ~df.method.isin(["NCL", "BSCE (baseline)", "CE"])]
    assert set(quoted.selection) == {""}


def test_seeds_and_epochs_where_the_papers_state_them():
    df = load()
    mllt = df[(df.paper == "MLLT") & (df.method == "MLLT")]
    assert set(mllt.seeds) == {3}
    ecl = df[(df.paper == "ECL") & (df.method == "ECL")]
    assert set(ecl[ecl.dataset.str.startswith("cifar")].seeds) == {5}
    assert set(ecl[~ecl.dataset.str.startswith("cifar")].seeds) == {3}  # "3 (large-scale datasets)"
    ncl = df[(df.paper == "NCL") & (df.method == "NCL")]
    assert set(ncl[ncl.dataset == "places-lt"].epochs) == {30}
    assert set(ncl[ncl.dataset != "places-lt"].epochs) == {400}


# -- presets ------------------------------------------------------------------------------------------------


def _setting_of(preset: str) -> tuple[str, int | None, str]:
    """(dataset, imbalance factor, backbone) a preset name promises."""
    m = re.fullmatch(r"(?:cbd_)?cifar(10|100)_lt_if(\d+)(?:_\w+)?", preset)
    if m:
        return f"cifar{m[1]}-lt", int(m[2]), "resnet32"
    m = re.fullmatch(r"(?:cbd_)?(imagenet_lt|inat2018|places_lt)_(r50|rx50|r152)(?:_\w+)?", preset)
    assert m, f"preset {preset!r} does not name its setting"
    dataset = {"imagenet_lt": "imagenet-lt", "inat2018": "inat2018", "places_lt": "places-lt"}[m[1]]
    return dataset, None, {"r50": "resnet50", "rx50": "resnext50_32x4d", "r152": "resnet152"}[m[2]]


def test_every_preset_named_exists_or_is_being_added_and_fits_its_row():
    shipped = {p.stem for p in PRESETS.glob("*.yaml")}
    for i, r in enumerate(raw_rows(), start=2):
        if not r["preset"]:
            assert not r["overrides"], f"line {i}: overrides without a preset"
            continue
        assert r["preset"] in shipped or r["preset"] in PRESETS_BEING_ADDED, f"line {i}: no preset {r['preset']!r}"
        dataset, imbalance, backbone = _setting_of(r["preset"])
        assert (r["dataset"], int(r["imbalance_factor"]) if r["imbalance_factor"] else None, r["backbone"]) == (
            dataset, imbalance, backbone), f"line {i}: {r['preset']} does not fit {r}"


def test_the_main_rows_point_at_their_own_presets():
    df = load(preset=[p.stem for p in PRESETS.glob("*.yaml")] + sorted(PRESETS_BEING_ADDED))
    own = {("MLLT", "MLLT"): "_mllt", ("NCL", "NCL"): "_ncl", ("ECL", "ECL"): "_ecl", ("CBD", "CBD_ENS"): "cbd_",
           ("SADE", "SADE"): "_sade", ("RIDE", "RIDE (3 experts)"): "_ride"}
    for (paper, method), part in own.items():
        rows = df[(df.paper == paper) & (df.method == method) & ~df.variant.str.startswith("ablation")]
        assert len(rows), (paper, method)
        assert rows.preset.str.contains(part).all(), (paper, method)
    for name in ("cifar100_lt_if100_mllt", "cifar100_lt_if100_ncl", "cifar100_lt_if100_ecl", "imagenet_lt_r50_ncl",
                 "inat2018_r50_ecl", "cbd_imagenet_lt_r50", "imagenet_lt_r50_bsce", "cifar10_lt_if100_ce"):
        assert name in set(df.preset), name


def test_overrides_resolve_on_their_presets():
    """Each (preset, overrides) pair is a valid config: every key exists and every value has its type."""
    from rayexperts.config import load_config

    shipped = {p.stem for p in PRESETS.glob("*.yaml")}
    pairs = {(r["preset"], r["overrides"]) for r in raw_rows() if r["preset"] in shipped}
    assert len(pairs) > 30
    for preset, overrides in sorted(pairs):
        cfg = load_config(preset, overrides.split())
        for item in overrides.split():
            key, _, value = item.partition("=")
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert str(node).lower() == value.lower(), (preset, item)
    baselines = [r for r in raw_rows() if r["method"] in ("CE", "PC Softmax", "Softmax", "BSCE (baseline)",
                                                          "Balanced Softmax") and r["preset"]]
    assert baselines and all(r["overrides"].split()[0] == "compat=official" for r in baselines)


# -- the numbers ----------------------------------------------------------------------------------------------

# (seed file or "docs/methods.md", filters naming one row, the text around its number). One row per table.
SPOT_CHECKS = [
    ("000", dict(paper="MLLT", table="Table 1", method="MLLT", backbone="resnet50", variant=""),
     "Ours 57.7 59.5 6.12 (1.4x) PaCo* [6] 57.0 58.2"),
    ("000", dict(paper="MLLT", table="Table 2", method="MLLT", metric="top1_few"),
     "RIDE [28] 67.6 53.5 35.9 Ours 70.2 56.7 39.1"),
    ("000", dict(paper="MLLT", table="Table 3", method="MLLT", imbalance_factor=100),
     "ACE [2] - 50.7 49.4 Ours 63.3 54.0 49.6"),
    ("000", dict(paper="MLLT", table="Table 4", method="MLLT"), "ACE [2] 72.9 Ours 74.9"),
    ("000", dict(paper="MLLT", table="Table 5", method="cRT", metric="top1_all",
                 variant="ablation: mutual learning, 2 experts, single expert"),
     "cRT [17] 61.0 43.5 19.9 42.6 63.2 46.9 22.4 45.2 (+2.6)"),
    ("000", dict(paper="MLLT", table="Table 6", method="LDAM+ML", metric="top1_all"),
     "LDAM+ML 66.6 46.4 22.2 46.2 (+3.6)"),
    ("000", dict(paper="MLLT", table="Table 7", metric="top1_all",
                 variant="ablation: 2 experts, L_cls + L_mut, PC softmax"),
     "2 ✓ ✓ ✓ 69.1 55.1 37.3 58.1"),
    ("000", dict(paper="MLLT", table="Table 8", method="RIDE (3 experts)+PC", metric="top1_few"),
     "RIDE+PC 59.7 51.7 45.3 53.9 (−1.0)"),
    ("001", dict(paper="MLLT", table="Table A2", method="MLLT", variant="single expert", backbone="resnext50_32x4d",
                 metric="top1_all"), "Ours (each expert) 65.8 53.3 36.4 55.8 68.0 54.4 37.1 57.3"),
    ("001", dict(paper="MLLT", table="Table A3", method="MLLT", variant="single expert"), "Ours (each expert) 73.0"),
    ("002", dict(paper="NCL", table="Table 1", method="NCL", variant="single expert", dataset="cifar10-lt",
                 imbalance_factor=100), "Ours (single) _ 53.3 56.8 84.7 86.8"),
    ("002", dict(paper="NCL", table="Table 2", method="NCL", variant="ensemble", dataset="places-lt"),
     "Ours (ensemble) _ 59.5 60.5 41.8"),
    ("002", dict(paper="NCL", table="Table 3", method="BSCE (baseline)", metric="top1_medium"),
     "BSCE (baseline) - 67.5 72.0 71.5 71.6"),
    ("002", dict(paper="NCL", table="Table 4", method="BSCE (baseline)", variant="w/o RandAugment"),
     "CE 41.88 44.79 BSCE 45.88 50.60"),
    ("002", dict(paper="NCL", table="Table 5", variant="ablation: BSCE loss; NIL + BOD_all + BOD_hard"),
     r"$\checkmark$ $\checkmark$ $\checkmark$ 49.34 53.19"),
    ("003", dict(paper="ECL", table="Table I", method="ECL", dataset="cifar10-lt", imbalance_factor=200),
     r"ECL (3 Experts) < $\checkmark$ $\checkmark$ 67.3 59.9 56.3 51.4 91.8 88.9 86.5 83.6"),
    ("003", dict(paper="ECL", table="Table II", method="NCL", dataset="inat2018"),
     "NCL (3 Expert) [20] 59.5 60.5 74.9"),
    ("003", dict(paper="ECL", table="Table III", variant="ablation: FLD only", dataset="imagenet-lt"),
     r"- $\checkmark$ - 54.7 + 2.5 58.9 + 3.8"),
    ("004", dict(paper="CBD", table="Table 1",
                 variant="ImageNet-LT val set; K=4 teachers: 2 standard + 2 data augmentation"),
     "K = 4 11 // 56.9"),
    ("004", dict(paper="CBD", table="Table 2", method="CBD_ENS", metric="top1_few"),
     "Ours - CBD _{ENS} 68.5 52.7 29.2 55.6"),
    ("004", dict(paper="CBD", table="Table 3", method="CBD", dataset="inat2017", backbone="resnet101"),
     "Ours - CBD 51.6 53.9 Ours - CBD 68.4 70.5 Ours - CBD 64.6 66.5"),
    ("004", dict(paper="CBD", table="Table 4", method="Teacher Ensemble", metric="top1_many"),
     "Teacher Ensemble 81.9 71.9 63.6 69.7"),
    ("004", dict(paper="CBD", table="Table 5", method="CBD_ENS"), "CBD- NCM CBD _{ENS} - NCM 50.7 54.0 64.5"),
    ("004", dict(paper="CBD", table="Section 4.3", method="Standard - Instance", dataset="inat2018"),
     "We obtain 47.1 and 64.7 overall accuracy for ImageNet-LT and iNaturalist18"),
    ("004", dict(paper="CBD", table="Section 4.4", method="CBD_ENS + Logit Adjustment"),
     "improves 0.5% over CBD_{ENS}, i.e., it achieves 56.1 accuracy"),
    ("004", dict(paper="CBD", table="Section A.6"), "The resulting model achieves 73.5% top-1 accuracy"),
    ("004", dict(paper="CBD", table="Table 6", method="CBD", backbone="resnet152", metric="top1_medium"),
     "Ours - CBD 65.2 48.0 25.9 51.6 68.1 50.1 27.1 53.9"),
    ("004", dict(paper="CBD", table="Table 7", method="LWS", backbone="resnet101", metric="top1_few"),
     "LWS [71.0 69.8 68.8 69.5 73.9 70.4 67.8 69.7"),
    ("004", dict(paper="CBD", table="Table 8", method="Classifier Re-training", backbone="resnet50", metric="top1_few"),
     "Classifier Re-training 71.7 59.3 53.7"),
    ("docs/methods.md", dict(paper="RIDE", table="MODEL_ZOO", method="RIDE (3 experts)", dataset="cifar100-lt"),
     "MODEL_ZOO.md (released checkpoints, with EA): CIFAR-100-LT IF100 ResNet-32, 3 experts **48.6**"),
    ("docs/methods.md", dict(paper="SADE", table="README Results", method="SADE", dataset="imagenet-lt", variant=""),
     "ImageNet-LT, **ResNeXt-50**: **58.8** (Softmax 48.0, RIDE 56.3)"),
]


def test_every_table_has_a_spot_check():
    tables = {(r["paper"], r["table"]) for r in raw_rows()}
    checked = {(f["paper"], f["table"]) for _, f, _ in SPOT_CHECKS}
    assert tables == checked, sorted(tables ^ checked)


@pytest.mark.parametrize("where, filters, snippet", SPOT_CHECKS,
                         ids=[f"{f['paper']}-{f['table']}" for _, f, _ in SPOT_CHECKS])
def test_spot_check(where, filters, snippet):
    rows = [r for r in raw_rows() if all(r[k] == str(v) for k, v in filters.items())]
    assert len(rows) == 1, f"{filters} names {len(rows)} rows"
    (row,) = rows
    assert printed(row["value"], snippet), f"{row['value']} is not printed in {snippet!r}"
    assert len(load(**filters)) == 1
    if where == "docs/methods.md":
        if METHODS_MD.is_file():
            assert norm(snippet) in norm(METHODS_MD.read_text())
        return
    assert f"(seeds/{where} line " in row["source"], row["source"]
    if SEEDS.is_dir():
        assert norm(snippet) in norm(seed_file(where).read_text()), f"snippet not in seeds/{where}"


@pytest.mark.skipif(not SEEDS.is_dir(), reason=f"the seed texts ({SEEDS}) are not beside the repository")
def test_every_number_is_on_the_seed_line_it_cites():
    lines = {p.name[:3]: p.read_text().split("\n") for p in SEEDS.glob("0*_*.txt")}
    cited = 0
    for i, r in enumerate(raw_rows(), start=2):
        m = re.search(r"\(seeds/(\d{3}) line (\d+)\)$", r["source"])
        if r["paper"] in ("MLLT", "NCL", "ECL", "CBD"):
            assert m, f"line {i}: source {r['source']!r} cites no seed line"
        if not m:
            continue
        text = lines[m[1]][int(m[2]) - 1]
        assert printed(r["value"], text), f"catalogue line {i}: {r['value']} not on seeds/{m[1]} line {m[2]}: {text!r}"
        cited += 1
    assert cited > 900


# -- the loader ------------------------------------------------------------------------------------------------


def test_load_filters_by_column():
    df = load(paper="NCL", metric="top1_all")
    assert len(df) > 50
    assert set(df.paper) == {"NCL"} and set(df.metric) == {"top1_all"}
    full = load()
    assert len(df) == ((full.paper == "NCL") & (full.metric == "top1_all")).sum()
    assert set(load(paper=["NCL", "ECL"]).paper) == {"NCL", "ECL"}
    cifar100 = load(dataset="cifar100-lt", imbalance_factor=100, method="NCL", variant="single expert", paper="NCL")
    assert cifar100.value.tolist() == [53.3]
    assert load(imbalance_factor=None).imbalance_factor.isna().all()
    assert set(load(imbalance_factor=[50, 100]).imbalance_factor) == {50, 100}


def test_an_unknown_filter_column_is_named():
    with pytest.raises(ValueError, match=r"'colour'.*paper, table, dataset"):
        load(paper="NCL", colour="red")


def _bad(df: pd.DataFrame, i: int, col: str, value: str) -> pd.DataFrame:
    df = df.copy()
    df.loc[i, col] = value
    return df


def test_check_names_the_line_and_column_of_a_bad_row():
    raw = pd.read_csv(CATALOG, dtype=str, keep_default_na=False)
    with pytest.raises(ValueError, match=r"line 5: column 'metric' is 'top5'"):
        check(_bad(raw, 3, "metric", "top5"))
    with pytest.raises(ValueError, match=r"line 2: column 'value' is 'n/a', not a number"):
        check(_bad(raw, 0, "value", "n/a"))
    with pytest.raises(ValueError, match=r"line 12: column 'value' is 145"):
        check(_bad(raw, 10, "value", "145"))
    with pytest.raises(ValueError, match=r"line 4: column 'epochs'"):
        check(_bad(raw, 2, "epochs", "two hundred"))
    with pytest.raises(ValueError, match=r"line 3: column 'method' is empty"):
        check(_bad(raw, 1, "method", ""))
    with pytest.raises(ValueError, match=r"line 3: column 'selection'"):
        check(_bad(raw, 1, "selection", "best"))
    with pytest.raises(ValueError, match=r"lacks column\(s\) seeds"):
        check(raw.drop(columns=["seeds"]))
    typed = load()
    with pytest.raises(ValueError, match=r"line 7: column 'metric'"):
        check(_bad(typed, 5, "metric", "top1"))
    with pytest.raises(ValueError) as err:
        check(_bad(raw, 0, "metric", "x"))
    assert "\n" not in str(err.value) and "line 2" in str(err.value)


def test_importing_the_catalogue_needs_no_torch():
    import subprocess

    code = "import sys, rayexperts.published as p; p.load(paper='CBD'); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
    assert published.CATALOG.is_file()


def test_every_row_with_a_preset_names_a_view_of_its_method():
    """``view``: which view of the preset's run gives the number (reproduce reads it): a view the method has."""
    from rayexperts.config import load_config
    from rayexperts.registry import METHODS

    df = load()
    for row in df[df["preset"] != ""].drop_duplicates(["preset", "overrides", "view"]).itertuples():
        cfg = load_config(row.preset, row.overrides.split())
        method = METHODS.get(cfg.method)
        if row.view == "":
            assert row.method == "CBD_ENS" and "NCM" in row.variant  # a probe, not a view: reproduce skips it
            continue
        assert row.view.removesuffix("_pc") in {"expert0", "ensemble", "student", "teacher_ensemble", "router"}, row
        if row.view.endswith("_pc"):
            assert method.pc_views, row
    pc = load(method="PC Softmax")
    pc = pc[pc["preset"] != ""]
    assert set(pc["view"]) == {"expert0_pc"} and set(load(method="CE")["view"]) <= {"expert0", ""}
