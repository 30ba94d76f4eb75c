"""The model card (README.md) written beside an exported model, and the upload to the Hugging Face Hub.

The card says what the weights are: the base model and its fingerprint, the method and its config, every edit
in force (subject, prompt, old answer -> new answer), and the run's final metrics when the export comes from a
run. Hub metadata (the YAML block at the top) names the base model and the library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

MAX_LISTED = 1000  # edits listed in the card; the rest are counted (all are in deltaedit.json)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def model_card(manifest: dict[str, Any], edits: Sequence[dict[str, Any]], metrics: dict[str, Any] | None) -> str:
    """The README.md of an export: ``manifest`` as the Editor writes it, ``edits`` as deltaedit.json lists them
    (edit_id and requests), ``metrics`` a run's last metrics.json checkpoint (or None)."""
    base = manifest.get("model_name") or "unknown"
    header = {"library_name": "transformers", "tags": ["deltaedit", "model-editing", manifest["method"]]}
    if base and not Path(base).is_absolute() and base.count("/") == 1:
        header["base_model"] = base  # a hub id; a local path means nothing to the Hub
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", ""]
    lines += [
        f"# {base}, edited with deltaedit ({manifest['method']})",
        "",
        f"This model is `{base}` with {len(edits)} facts rewritten by `deltaedit` "
        f"{manifest.get('deltaedit_version', '')} using **{manifest['method']}**. Only the MLP output projections "
        f"of layers {manifest['config'].get('layers')} differ from the base model.",
        "",
        "## Base model",
        "",
        f"- name: `{base}` ({manifest.get('model_type')}, {manifest.get('dtype')}, d_model {manifest.get('d_model')}, "
        f"d_ff {manifest.get('d_ff')})",
        f"- weight fingerprint: `{manifest.get('base_fingerprint')}`; edited layers' sha256: "
        + ", ".join(f"{k}: `{v[:16]}…`" for k, v in (manifest.get("base_layers") or {}).items()),
        "",
        "The edits alone (a few kB each) can be re-applied to that base with `deltaedit.apply_edits`, which checks",
        "the fingerprint first.",
        "",
        "## Method and config",
        "",
        "```yaml",
        yaml.safe_dump({"method": manifest["method"], **manifest["config"]}, sort_keys=False).strip(),
        "```",
        "",
        "## Edits",
        "",
        "| edit | subject | prompt | old answer | new answer |",
        "|---:|---|---|---|---|",
    ]
    for edit in edits[:MAX_LISTED]:
        for request in edit["requests"]:
            prompt = request["prompt"].replace("{}", request["subject"])
            old = request.get("target_true") or "?"
            lines.append(
                f"| {edit['edit_id']} | {_cell(request['subject'])} | {_cell(prompt)} | {_cell(old)} | "
                f"{_cell(request['target_new'])} |"
            )
    if len(edits) > MAX_LISTED:
        lines.append(f"| … | {len(edits) - MAX_LISTED} more edits are listed in deltaedit.json | | | |")
    if metrics:
        lines += ["", f"## Metrics after {metrics.get('n_edits')} edits", ""]
        for group, values in metrics.get("metrics", {}).items():
            if isinstance(values, dict) and all(isinstance(v, int | float | type(None)) for v in values.values()):
                shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, int | float))
                lines.append(f"- {group}: {shown}")
    lines += ["", "Made with [deltaedit](https://pypi.org/project/deltaedit/)."]
    return "\n".join(lines) + "\n"


def last_checkpoint(run_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The last checkpoint of a run's metrics.json, or None."""
    if run_dir is None:
        return None
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    checkpoints = json.loads(path.read_text()).get("checkpoints") or []
    return checkpoints[-1] if checkpoints else None


class HubError(RuntimeError):
    """The Hub cannot be reached or refuses the upload; nothing was written or uploaded."""


def check_hub(repo_id: str, token: str | None = None) -> None:
    """Fail before anything is written when the upload cannot happen: offline mode, no network, no token."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_token

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise HubError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it to upload, or export locally only")
    if (token or get_token()) is None:
        raise HubError(f"--push-to-hub {repo_id}: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    try:
        HfApi(token=token).whoami()
    except Exception as err:  # network errors, refused tokens: all mean the upload cannot happen
        raise HubError(f"--push-to-hub {repo_id}: the Hub cannot be reached or refused the token ({err})") from None


def push_folder(folder: Path, repo_id: str, token: str | None = None, private: bool = True) -> str:
    """Upload an exported model directory (weights and card) to ``repo_id``; returns the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="deltaedit export")
    return str(url)
