"""Run records and the report: the checkpoint schedule, metrics.json round trip, Table 1 side by side with
blanks for what a run lacks, and the three plots as valid PNG files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from matplotlib import image

from deltaedit.report import (
    RunFileError,
    add_checkpoint,
    checkpoint_schedule,
    join_checkpoints,
    new_run_record,
    read_metrics,
    write_metrics,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, []),
        (10, [10]),
        (50, [50]),
        (120, [50, 100, 120]),
        (3000, [50, 100, 200, 500, 1000, 2000, 3000]),
        (5000, [50, 100, 200, 500, 1000, 2000, 3000, 5000]),
    ],
)
def test_checkpoint_schedule(n, expected):
    assert checkpoint_schedule(n) == expected


def test_checkpoint_schedule_custom_points():
    assert checkpoint_schedule(7, points=(5, 2, 9)) == [2, 5, 7]


def cf(eff_top, gen_top, spe_top, eff_l, gen_l, spe_l):
    names = ("efficacy_top", "generalization_top", "specificity_top")
    names += ("efficacy_larger", "generalization_larger", "specificity_larger")
    return {"counterfact": dict(zip(names, (eff_top, gen_top, spe_top, eff_l, gen_l, spe_l), strict=True))}


def diag(noise, ktb):
    return {"noise_E": noise, "ktb": ktb, "ktb_abs": abs(ktb), "delta_norm": 1.5, "cond": 12.0, "triggered_share": 0.1}


def make_runs(tmp_path):
    alpha = new_run_record("alphaedit", "gpt2-xl", "counterfact", 100, seed=1, config={"layers": [13, 17]})
    add_checkpoint(alpha, 100, 20.0, cf(0.8593, 0.4623, 0.5318, 0.9837, 0.8805, 0.9273), diag(2780.7, 0.0064))
    add_checkpoint(alpha, 50, 10.0, cf(0.95, 0.6, 0.6, 0.99, 0.9, 0.93), diag(1.79, 0.01))
    write_metrics(tmp_path / "alpha", alpha)

    delta = new_run_record("deltaedit", "gpt2-xl", "counterfact", 100)
    add_checkpoint(delta, 50, 11.0, cf(0.97, 0.6, 0.6, 0.99, 0.9, 0.93), diag(1.5, 0.009))
    add_checkpoint(delta, 100, 22.0, cf(0.938, 0.5437, 0.5328, 0.9897, 0.911, None), diag(900.0, 0.005))
    write_metrics(tmp_path / "delta", delta)

    # a zsRE run of the same method and model, written by hand as any tool would: it joins DeltaEdit's row
    (tmp_path / "delta-zsre").mkdir()
    zsre = {
        "run": {"name": "deltaedit", "method": "deltaedit", "model": "gpt2-xl", "dataset": "zsre", "n_edits": 100},
        "checkpoints": [
            {
                "n_edits": 100,
                "seconds": 30.0,
                "metrics": {"zsre": {"efficacy": 0.9526, "generalization": 0.8848, "specificity": 0.2496}},
            }
        ],
    }
    (tmp_path / "delta-zsre" / "metrics.json").write_text(json.dumps(zsre))
    return [tmp_path / "alpha", tmp_path / "delta", tmp_path / "delta-zsre"]


def table_row(report: str, label: str, table: int = 0) -> list[str]:
    """A row's cells in Table 1 (table 0) or its companion (table 1)."""
    lines = [line for line in report.splitlines() if line.startswith(f"| gpt2-xl | {label} |")]
    return [cell.strip() for cell in lines[table].strip().strip("|").split("|")]


def test_write_report(tmp_path):
    out = tmp_path / "report"
    path = write_report(make_runs(tmp_path), out)
    report = path.read_text()
    assert path == out / "report.md"
    header = report.splitlines()[report.splitlines().index("## Table 1") + 4]
    assert header.startswith("| Model | Method | CounterFact top Eff. | CounterFact top Gen. | CounterFact top Spe.")
    assert header.endswith("ZsRE Eff. | ZsRE Gen. | ZsRE Spe. | Edits |")
    # final checkpoint, in %, blank where the run has no value
    alpha = ["gpt2-xl", "alphaedit", "85.93", "46.23", "53.18", "98.37", "88.05", "92.73", "", "", "", "100"]
    delta = ["gpt2-xl", "deltaedit", "93.80", "54.37", "53.28", "98.97", "91.10", "93.00", "95.26", "88.48", "24.96"]
    assert table_row(report, "alphaedit") == alpha
    # specificity_larger is None at 100 edits: the last checkpoint that has it (50 edits) stands
    assert table_row(report, "deltaedit") == [*delta, "100"]

    for name in ("efficacy_top.png", "noise_E.png", "ktb.png", "zsre_efficacy.png", "zsre_generalization.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        pixels = image.imread(out / name)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert f"]({name})" in report
    assert "### alphaedit" in report and "2781" in report  # noise_E in the checkpoint table


def test_report_at_a_common_edit_count(tmp_path):
    alpha, delta, delta_zsre = make_runs(tmp_path)
    report = write_report([alpha, delta], tmp_path / "at50", at=50).read_text()
    assert "Each run at 50 edits" in report
    alpha_row = table_row(report, "alphaedit")
    assert alpha_row[2:5] == ["95.00", "60.00", "60.00"] and alpha_row[-1] == "50"
    assert "2781" not in report  # the checkpoint after 50 is gone from the checkpoint tables too
    with pytest.raises(ValueError, match=r"at: .*delta-zsre.*no checkpoint at 50 edits \(it has \[100\]\)"):
        write_report([alpha, delta_zsre], tmp_path / "bad", at=50)


def test_report_rows_by_method(tmp_path):
    runs = []
    for name, dataset, metrics in [
        ("memit-cf-500", "counterfact", cf(0.9, 0.3, 0.8, 0.95, 0.5, 0.97)),
        ("memit-zsre-500", "zsre", {"zsre": {"efficacy": 0.7, "generalization": 0.6, "specificity": 0.8}}),
    ]:
        run = new_run_record("memit", "gpt2-xl", dataset, 50, name=name)
        # "stream" is in every dataset's run and in no Table 1 column: it does not make the two runs collide
        add_checkpoint(run, 50, 1.0, {**metrics, "stream": {"held_when_made": 0.9}})
        write_metrics(tmp_path / name, run)
        runs.append(tmp_path / name)
    by_name = write_report(runs, tmp_path / "names").read_text()
    assert table_row(by_name, "memit-cf-500")[-4:] == ["", "", "", "50"]
    by_method = write_report(runs, tmp_path / "methods", rows="method").read_text()
    counterfact, zsre = ["90.00", "30.00", "80.00", "95.00", "50.00", "97.00"], ["70.00", "60.00", "80.00"]
    assert table_row(by_method, "memit")[2:] == [*counterfact, *zsre, "50"]
    assert "### memit (counterfact)" in by_method and "### memit (zsre)" in by_method  # legends follow the rows
    # two CounterFact runs of one method cannot share a row: one would hide the other
    again = new_run_record("memit", "gpt2-xl", "counterfact", 50, name="memit-cf-lr1")
    add_checkpoint(again, 50, 1.0, cf(0.5, 0.3, 0.8, 0.95, 0.5, 0.97))
    write_metrics(tmp_path / "again", again)
    with pytest.raises(ValueError, match="rows: runs 'memit-cf-500' and 'memit-cf-lr1' both give memit's counterfact"):
        write_report([*runs, tmp_path / "again"], tmp_path / "bad", rows="method")
    with pytest.raises(ValueError, match="rows: use 'name' or 'method'"):
        write_report(runs, tmp_path / "bad", rows="dataset")


def test_erosion_table_reads_each_dataset_from_its_own_run(tmp_path):
    """The companion table: per dataset the lost edits and noise_E, and model health where it was measured,
    each from the run that gives the row its figures on that dataset, at the checkpoint read."""
    health = {
        "perplexity": {"wikitext2": 34.237, "unedited": 27.614},
        "general": {
            "f1": {"sst2": 0.5},
            "unedited": {"sst2": 0.5307},
            "delta": {"sst2": -0.0307},
            "mean_delta": -0.0307,
        },
        "fluency": {"entropy": 4.3, "entropy_unedited": 4.36},
        "representations": {},
    }
    runs = []
    for name, dataset, metrics, stream, noise in [
        ("memit-cf", "counterfact", {**cf(0.9, 0.3, 0.8, 0.95, 0.5, 0.97), **health}, (8, 143), 2410.4),
        ("memit-zsre", "zsre", {"zsre": {"efficacy": 0.2, "generalization": 0.1, "specificity": 0.3}}, (72, 412), 9125),
    ]:
        run = new_run_record("memit", "gpt2-xl", dataset, 100, name=name)
        add_checkpoint(run, 50, 1.0, {**metrics, "stream": {"failed_when_made": 1, "eroded": 0}}, diag(5.0, 0.01))
        stream_100 = {"failed_when_made": stream[0], "eroded": stream[1]}
        add_checkpoint(run, 100, 2.0, {**metrics, "stream": stream_100}, diag(noise, 0.01))
        write_metrics(tmp_path / name, run)
        runs.append(tmp_path / name)
    report = write_report(runs, tmp_path / "out", rows="method").read_text()
    header = next(line for line in report.splitlines() if "CounterFact noise_E" in line)
    assert header == (
        "| Model | Method | CounterFact noise_E | CounterFact failed when made / eroded | CounterFact WikiText-2 ppl "
        "(unedited) | CounterFact mean ΔF1 | ZsRE noise_E | ZsRE failed when made / eroded |"
    )  # no zsRE health columns: that run has no health
    assert table_row(report, "memit", 1)[2:] == ["2410", "8 / 143", "34.24 (27.61)", "-3.1", "9125", "72 / 412"]
    at_50 = write_report(runs, tmp_path / "at50", at=50, rows="method").read_text()
    assert table_row(at_50, "memit", 1)[2:] == ["5", "1 / 0", "34.24 (27.61)", "-3.1", "5", "1 / 0"]
    plain = new_run_record("ft", "gpt2-xl", "counterfact", 10)
    add_checkpoint(plain, 10, 1.0, cf(0.1, 0.1, 0.1, 0.5, 0.5, 0.5))  # nothing for the companion table
    write_metrics(tmp_path / "plain", plain)
    assert "failed when made" not in write_report([tmp_path / "plain"], tmp_path / "plain-out").read_text()


def test_plots_without_data_are_skipped(tmp_path):
    run = new_run_record("memit", "llama3-8b", "counterfact", 10)
    add_checkpoint(run, 10, 1.0, cf(0.1, 0.1, 0.1, 0.5, 0.5, 0.5))  # no diagnostics
    write_metrics(tmp_path / "run", run)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "noise_E.png").write_bytes(b"stale")
    report = write_report([tmp_path / "run"], tmp_path / "out").read_text()
    assert (tmp_path / "out" / "efficacy_top.png").exists()
    assert not (tmp_path / "out" / "noise_E.png").exists() and not (tmp_path / "out" / "ktb.png").exists()
    assert "no run has this value" in report


def test_metrics_file_round_trip_and_errors(tmp_path):
    run = new_run_record("deltaedit", "smollm2-135m", "counterfact", 3, name="deltaedit-eta1.5")
    add_checkpoint(run, 3, 1.0, cf(1.0, 0.5, float("nan"), 1.0, 1.0, 1.0), {"cond": float("inf")})
    add_checkpoint(run, 3, 2.0, cf(1.0, 0.5, 0.25, 1.0, 1.0, 1.0))  # the same checkpoint again replaces it
    path = write_metrics(tmp_path, run)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind
    again = read_metrics(tmp_path)
    assert again["run"]["name"] == "deltaedit-eta1.5" and again["schema"] == 1
    assert [c["seconds"] for c in again["checkpoints"]] == [2.0]

    run["checkpoints"][0]["diagnostics"] = {"cond": float("inf")}
    run["checkpoints"][0]["metrics"]["counterfact"]["specificity_top"] = float("nan")
    write_metrics(tmp_path, run)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: non-finite values are null
    assert read_metrics(path)["checkpoints"][0]["diagnostics"]["cond"] is None

    with pytest.raises(RunFileError, match="no such file"):
        read_metrics(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    with pytest.raises(RunFileError, match="not valid JSON"):
        write_report([tmp_path / "bad"], tmp_path / "out")
    (tmp_path / "bad" / "metrics.json").write_text('{"run": {}, "checkpoints": [{"edits": 3}]}')
    with pytest.raises(RunFileError, match="n_edits"):
        read_metrics(tmp_path / "bad")


def test_a_run_measured_in_parts_joins_into_one_metrics_file():
    """A run carried on with --targets in a new directory measures only its later checkpoints; joined with the
    earlier part it is the whole run, and parts of different runs or disagreeing checkpoints are refused."""
    early = new_run_record("deltaedit", "smollm2-135m", "counterfact", 3000, name="de-3000")
    late = new_run_record("deltaedit", "smollm2-135m", "counterfact", 3000, name="de-3000")
    for n in (50, 100):
        add_checkpoint(early, n, float(n), cf(1.0, 0.5, 0.25, 1.0, 1.0, 1.0))
    add_checkpoint(late, 100, 1.0, cf(1.0, 0.5, 0.25, 1.0, 1.0, 1.0))  # measured again: the same figures
    add_checkpoint(late, 2000, 9.0, cf(0.9, 0.4, 0.2, 1.0, 1.0, 1.0))
    joined = join_checkpoints([late, early])
    assert joined["run"] == early["run"] and [c["n_edits"] for c in joined["checkpoints"]] == [50, 100, 2000]
    assert joined["checkpoints"][2]["metrics"]["counterfact"]["efficacy_top"] == 0.9

    other = new_run_record("alphaedit", "smollm2-135m", "counterfact", 3000, name="de-3000")
    with pytest.raises(RunFileError, match="different runs .*method"):
        join_checkpoints([early, other])
    add_checkpoint(late, 50, 1.0, cf(0.5, 0.5, 0.25, 1.0, 1.0, 1.0))
    with pytest.raises(RunFileError, match="checkpoint 50 is in two parts"):
        join_checkpoints([early, late])


def test_committed_results_may_hold_targets_files():
    """A run that outlives its machine goes on from docs/results/NAME/targets.safetensors, so the repository's
    ignore rules (which keep other safetensors files out) must let that file in."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=root, check=False)
        assert result.returncode in (0, 1), "git check-ignore failed"
        return result.returncode == 0

    assert not ignored("docs/results/some-run/targets.safetensors")
    assert ignored("docs/results/some-run/model.safetensors")
