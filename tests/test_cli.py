"""The command line on a tiny Llama saved to disk, in process (``deltaedit.cli.main``): log, undo, export (a
Hugging Face directory, or the edits alone), report, edit, config, and the errors of bad options and of
``download`` without a data folder or a network. ``deltaedit run`` itself is tested in test_run.py, whose
helpers (model directory, edit file, fast ``--set`` options) this module shares.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_run import (
    LAYERS,
    PNG_SIGNATURE,
    base_model,
    edited_weights,
    kinds,
    make_assets,
    overrides,
    resumed,
    run_args,
    same_params,
    set_args,
)
from transformers import AutoModelForCausalLM

from deltaedit import Editor, Ledger
from deltaedit.cli import main
from deltaedit.defaults import coerce_overrides, default_config, read_overrides
from deltaedit.methods import DeltaEdit, DeltaEditConfig
from deltaedit.models import find_parts, out_weight

N_EDITS = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    return make_assets(tmp_path_factory.mktemp("cli-assets"), tokenizer)


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A run of 6 edits made with ``deltaedit run``; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("cli-run") / "run"
    assert main(run_args(assets, out, N_EDITS)) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


def base_weights(assets) -> dict[int, torch.Tensor]:
    model, _ = base_model(assets)
    parts = find_parts(model)
    return {i: out_weight(parts.out_projs[i]).detach().clone() for i in LAYERS}


# --- log -------------------------------------------------------------------------------------------------


def test_log_lists_the_edits(finished, capsys):
    assert main(["log", str(finished)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == N_EDITS
    assert "edit     0" in lines[0] and "'The mother tongue of Danielle Darrieux' -> 'German'" in lines[0]
    assert "'The capital city of France' -> 'Tokyo'" in lines[1]
    assert all(" p=" in line and (" ok " in line or " MISS " in line) for line in lines)

    assert main(["log", str(finished), "--json"]) == 0
    raw = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert raw == [e.data for e in Ledger(finished, create=False).entries()]


def test_log_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["log", str(tmp_path / "missing")]) == 2
    assert "deltaedit log: error: " in capsys.readouterr().err


# --- undo ------------------------------------------------------------------------------------------------


def test_undo_one_edit_then_all(run_copy, assets, capsys):
    assert main(["undo", str(run_copy), "--edit", "1", "--quiet", "--device", "cpu"]) == 0
    assert "undid edit 1; 5 edits remain in force" in capsys.readouterr().out
    assert kinds(run_copy) == ["edit"] * N_EDITS + ["undo"]

    editor = resumed(run_copy, assets)
    assert [a.edit_id for a in editor.applied] == [0, 2, 3, 4, 5]
    # each edited layer is W0 + the other edits' updates, summed in float32 in order: bit for bit
    expected = {i: w.float().clone() for i, w in base_weights(assets).items()}
    for entry in Ledger(run_copy, create=False).active_edits():
        for layer, update in entry.updates().items():
            expected[layer] += update.left @ update.right.T
    for layer, weight in edited_weights(editor).items():
        assert torch.equal(weight, expected[layer]), layer

    assert main(["log", str(run_copy)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("undo   [1]")

    assert main(["undo", str(run_copy), "--to", "-1", "--quiet"]) == 0
    assert "undid 5 edits; 0 remain in force" in capsys.readouterr().out
    editor = resumed(run_copy, assets)
    assert editor.applied == []
    base, _ = base_model(assets)
    assert same_params(editor.model, base)  # exactly the base model again


def test_undo_of_an_edit_that_is_not_in_force(run_copy, capsys):
    assert main(["undo", str(run_copy), "--edit", "17", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltaedit undo: error: ") and "17" in err, err
    assert kinds(run_copy) == ["edit"] * N_EDITS  # nothing recorded


# --- export ----------------------------------------------------------------------------------------------


def test_export_writes_a_model_plain_transformers_loads(finished, assets, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(finished), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert f"edited model ({N_EDITS} edits) and its model card saved to {out}" in capsys.readouterr().out
    info = json.loads((out / "deltaedit.json").read_text())
    assert [e["edit_id"] for e in info["edits"]] == list(range(N_EDITS))

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base, _ = base_model(assets)
    base_state, state = base.state_dict(), exported.state_dict()
    assert state.keys() == base_state.keys()
    changed = {name for name in state if not torch.equal(state[name], base_state[name])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in LAYERS}
    editor = resumed(finished, assets)
    for layer, weight in edited_weights(editor).items():
        assert torch.equal(state[f"model.layers.{layer}.mlp.down_proj.weight"], weight)

    # an existing directory is kept unless --force
    assert main(["export", str(finished), "--out", str(out), "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(finished), "--out", str(out), "--quiet", "--force"]) == 0


def test_export_edits_only(finished, assets, tmp_path, capsys):
    path = tmp_path / "edits.safetensors"
    assert main(["export", str(finished), "--out", str(path), "--edits-only", "--quiet"]) == 0
    assert f"{N_EDITS} edits saved to {path}" in capsys.readouterr().out
    model_bytes = sum(p.stat().st_size for p in assets.model.glob("*.safetensors"))
    assert path.stat().st_size < model_bytes / 4  # the edits alone: far smaller than the model

    model, tokenizer = base_model(assets)
    editor = Editor.from_edits(path, model, tokenizer, progress=False)
    assert [a.edit_id for a in editor.applied] == list(range(N_EDITS))
    assert same_params(editor.model, resumed(finished, assets).model)

    assert main(["export", str(finished), "--out", str(path), "--edits-only", "--quiet"]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_undo_and_export_load_the_base_model_in_the_runs_dtype(assets, tmp_path, capsys):
    """A run made with --dtype bfloat16 is continued on the bfloat16 base, whose fingerprint the ledger holds."""
    out = tmp_path / "run"
    assert main([*run_args(assets, out, 1, checkpoints="1"), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"
    assert main(["export", str(out), "--out", str(tmp_path / "model"), "--quiet"]) == 0, capsys.readouterr().err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert exported.dtype == torch.bfloat16
    assert main(["undo", str(out), "--edit", "0", "--quiet"]) == 0, capsys.readouterr().err


# --- report ----------------------------------------------------------------------------------------------


def test_report(finished, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(finished), "--out", str(out)]) == 0
    assert f"report written to {out / 'report.md'}" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert text.startswith("# Editing report") and "| Model | Method |" in text and "| 2 | " in text
    assert (out / "efficacy_top.png").read_bytes()[:8] == PNG_SIGNATURE

    assert main(["report", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "metrics.json" in capsys.readouterr().err
    assert main(["report", str(finished), "--out", str(out), "--at", "7", "--rows", "method"]) == 2
    assert "at: " in (err := capsys.readouterr().err) and "no checkpoint at 7 edits" in err


# --- run: refusals ---------------------------------------------------------------------------------------


def test_run_refuses_an_existing_run_and_a_resume_of_nothing(finished, assets, tmp_path, capsys):
    assert main(run_args(assets, finished, 2)) == 2
    assert "already holds a run; pass --resume to continue it or --force to replace it" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no run.json, so nothing to resume" in capsys.readouterr().err


# --- edit and config -------------------------------------------------------------------------------------


def test_edit_shows_predictions_before_and_after(assets, capsys):
    args = ["edit", "--model", str(assets.model), "--device", "cpu", "--quiet"]
    args += ["--prompt", "The capital city of {}", "--subject", "France", "--target", "Tokyo"]
    assert main(args + set_args(overrides(assets.corpus))) == 0  # 0: the edit succeeded
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "prompt: The capital city of France"
    before = next(line for line in lines if line.startswith("before: "))
    after = next(line for line in lines if line.startswith("after: "))
    assert not before.startswith("before: 'Tokyo'")
    assert after.split()[1] == "'Tokyo'"  # the new target is the top prediction
    assert lines[-1].startswith("deltaedit: ") and "P(target)=" in lines[-1]


def test_config_prints_the_effective_options(assets, capsys):
    args = ["config", "--model", str(assets.model), "--device", "cpu", "--quiet", "--method", "alphaedit"]
    args += ["--set", "steps=3", "--set", "nullspace_threshold=1e-3", "--set", "layers=[0, 2]"]
    assert main(args) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["steps"] == 3 and config["layers"] == [0, 2]
    assert config["nullspace_threshold"] == 1e-3  # YAML 1.1 would read "1e-3" as a string
    assert "eta" not in config  # AlphaEdit's options


def test_config_shows_each_preset_and_overrides_win(assets, capsys):
    base = ["config", "--model", str(assets.model), "--device", "cpu", "--quiet", "--method", "deltaedit"]
    shown = {}
    for preset in ("default", "paper", "research"):
        assert main([*base, "--preset", preset]) == 0
        out = capsys.readouterr()
        shown[preset] = json.loads(out.out)
        assert "presets of deltaedit: default, paper, research" in out.err
    assert shown["research"]["projection"] == "lowrank" and shown["research"]["warmup"] == 20
    assert shown["research"]["cap_fraction"] == 0.25 and shown["research"]["eig_cut"] == 0.1
    assert shown["paper"]["projection"] == "eigh" and shown["paper"]["cap_fraction"] == 0.75
    # the project's default, chosen on counterfact-val: the paper's trigger with the targeted constraint
    assert shown["default"] == {**shown["paper"], "constraint": "targeted"} != shown["research"]
    assert shown["research"]["layers"] == shown["default"]["layers"]  # the model's own defaults stay
    assert main([*base, "--preset", "research", "--set", "warmup=7"]) == 0
    assert json.loads(capsys.readouterr().out)["warmup"] == 7


def test_an_unknown_preset_is_named_before_loading(tmp_path, capsys):
    assert main(["config", "--model", str(tmp_path / "no-model"), "--quiet", "--preset", "fast"]) == 2
    err = capsys.readouterr().err
    assert "preset: deltaedit has no preset 'fast'; available: default, paper, research" in err


def test_threads_sets_torchs_cpu_threads_and_refuses_zero(assets, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["config", "--model", str(assets.model), "--device", "cpu", "--quiet", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["config", "--model", str(assets.model), "--threads", "0"])
    assert "--threads: must be a whole number >= 1, not 0" in capsys.readouterr().err


CONFIG_FILES = {
    # PyYAML (YAML 1.1) reads 1e-3 and 1e9 as strings; a JSON file may quote its numbers
    "yaml": "lr: 1e-3\nweight_decay: 5e-4\nnullspace_threshold: 1e9\nstats_samples: 1e2\nsteps: 3\nlayers: [0, 2]\n",
    "json": '{"lr": "1e-3", "weight_decay": 5e-4, "nullspace_threshold": "1e9", "stats_samples": "100", '
    '"steps": 3, "layers": [0, 2]}',
}


@pytest.mark.parametrize("suffix", sorted(CONFIG_FILES))
def test_config_file_values_become_numbers(assets, tmp_path, capsys, suffix):
    path = tmp_path / f"options.{suffix}"
    path.write_text(CONFIG_FILES[suffix])
    args = ["config", "--model", str(assets.model), "--device", "cpu", "--quiet", "--config", str(path)]
    assert main(args) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["lr"] == 1e-3 and config["weight_decay"] == 5e-4 and config["nullspace_threshold"] == 1e9
    assert config["stats_samples"] == 100 and isinstance(config["stats_samples"], int)
    assert config["steps"] == 3 and config["layers"] == [0, 2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: fast\n", "lr: expected a number, got 'fast' in config file "),
        ("steps: 2.5\n", "steps: expected an integer, got 2.5 in config file "),
        ("kl_factor: true\n", "kl_factor: expected a number, got True in config file "),
        ("project_moments: maybe\n", "project_moments: expected true or false, got 'maybe' in config file "),
        ("layers: [0, one]\n", "layers: expected an integer, got 'one' in config file "),
    ],
)
def test_a_config_file_value_of_the_wrong_type_is_named_before_loading(tmp_path, capsys, text, message):
    path = tmp_path / "options.yaml"
    path.write_text(text)
    assert main(["config", "--model", str(tmp_path / "no-model"), "--quiet", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deltaedit config: error: {message}{path}"), err
    assert "could not load" not in err  # refused before the model was loaded


def test_set_value_of_the_wrong_type_is_named(tmp_path, capsys):
    assert main(["config", "--model", str(tmp_path / "no-model"), "--quiet", "--set", "lr=fast"]) == 2
    assert "deltaedit config: error: lr: expected a number, got 'fast' in --set 'lr=fast'" in capsys.readouterr().err


def test_overrides_are_converted_by_the_option_type(tmp_path):
    """read_overrides and default_config (the API path) convert by the method's field types; ints stay ints for
    float options, so the fingerprint of a config written with ``l2: 1`` does not change."""
    path = tmp_path / "alpha.yaml"
    path.write_text("nullspace_threshold: 2e-2\nl2: 1\nstats_corpus: null\nseed: '7'\n")
    values = read_overrides(path, "alphaedit")
    assert values == {"nullspace_threshold": 0.02, "l2": 1, "stats_corpus": None, "seed": 7}
    assert isinstance(values["l2"], int)
    with pytest.raises(ValueError, match="^steps: expected an integer, got 'x'; write a plain number, e.g. steps: 25$"):
        coerce_overrides({"steps": "x"}, DeltaEditConfig)
    config = default_config(tiny_model("llama"), DeltaEdit, {"lr": "1e-3", "layers": "0,1"})
    assert config.lr == 1e-3 and config.layers == (0, 1)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("steps", "--set: expected NAME=VALUE, got 'steps'"),
        ("layers=[0,1", "--set layers: cannot read '[0,1'"),
    ],
)
def test_bad_set_syntax_fails_before_loading_the_model(option, message, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["config", "--model", str(tmp_path / "no-model"), "--set", option])
    assert str(info.value.code).startswith(message)


def test_unknown_option_is_named(assets, capsys):
    assert main(["config", "--model", str(assets.model), "--device", "cpu", "--set", "stepz=3", "--quiet"]) == 2
    assert "deltaedit config: error: stepz: not an option of deltaedit" in capsys.readouterr().err


def test_a_model_that_cannot_be_loaded(tmp_path, capsys):
    assert main(["config", "--model", str(tmp_path / "no-model"), "--quiet"]) == 2
    assert "no-model: no such directory" in capsys.readouterr().err


# --- download --------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


def test_download_needs_a_data_folder(monkeypatch, no_network, capsys):
    monkeypatch.delenv("DELTAEDIT_DATA", raising=False)
    assert main(["download", "counterfact"]) == 2
    err = capsys.readouterr().err
    assert "deltaedit download: error: --data: name the data folder" in err and "DELTAEDIT_DATA" in err
    assert no_network == []


def test_download_without_a_network_says_what_to_do(tmp_path, no_network, capsys):
    data = tmp_path / "data"
    assert main(["download", "counterfact", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "could not download https://rome.baulab.info/data/dsets/counterfact.json" in err
    assert f"put it at {data / 'counterfact.json'}" in err
    assert len(no_network) == 1
    assert list(data.iterdir()) == []  # no partial file left behind

    assert main(["download", "wikipedia", "--data", str(data)]) == 2
    assert "cannot download 'wikipedia'; downloadable datasets: counterfact, zsre" in capsys.readouterr().err
    assert len(no_network) == 1
