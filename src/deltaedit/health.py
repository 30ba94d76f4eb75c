"""Model health: what edits cost the model besides the facts they write (paper §5.4, §5.5, appendix C.5).

Measured on the unedited model once and at every checkpoint of a run (``deltaedit run --health``):

* ``general``: F1 on CoLA, MMLU, MRPC, NLI, RTE and SST-2 subsets (``$DELTAEDIT_DATA/general/``). Each example
  is answered by comparing the probabilities of its label words (" yes" / " no", " positive" / " negative",
  " A" .. " D") right after a fixed few-shot prompt of our own (:data:`TASKS`), as AlphaEdit's general-capability
  check does, calibrated against the same prompt with "N/A" in every field (contextual calibration, Zhao et al.
  2021: a small model's prior for one label word otherwise decides every answer); macro F1 by scikit-learn on a
  fixed random subset (100 per task by default) with the shots drawn from the rest.
* ``fluency``: ROME / MEMIT's generation entropy (the 2- and 3-gram entropies weighted 2/3 and 4/3, averaged) of
  greedy continuations of the first edited records' prompts, and the share that mention their new target.
* ``perplexity``: on the first tokens of WikiText-2's test split, in non-overlapping windows.
* ``representations``: hidden states (block outputs at the last prompt token) of ROME's known facts
  (``known/known_1000.json``) at the critical and the last layer, edited against unedited: the mean cosine
  distance of each prompt's pair and the maximum mean discrepancy (RBF kernel, bandwidth the unedited cloud's
  median distance) between the two clouds. The states are kept in the run directory for the t-SNE picture.
* ``case_study``: the unedited and the edited continuation of a few edited prompts, side by side.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import data_folder
from .data.records import EditRecord
from .models import ModelParts
from .predict import final_logits, input_device, logits_at
from .tokens import first_tokens, length_batches, pad, pad_id


@dataclass(frozen=True)
class Task:
    """A classification subset: its file, how an example becomes a prompt, and its label words."""

    file: str
    instruction: str
    template: str  # format string over the example's fields
    labels: dict[str, str]  # label value (as text) -> label word


TASKS: dict[str, Task] = {
    "cola": Task(
        "cola.jsonl",
        "Is each sentence grammatically acceptable English? Answer yes or no.",
        "Sentence: {sentence}\nAnswer:",
        {"1": " yes", "0": " no"},
    ),
    "mmlu": Task(
        "mmlu.jsonl",
        "Answer each multiple choice question with the letter of the right choice.",
        "Question ({subject_name}): {question}\nA. {choice_a}\nB. {choice_b}\nC. {choice_c}\nD. {choice_d}\nAnswer:",
        {"0": " A", "1": " B", "2": " C", "3": " D"},
    ),
    "mrpc": Task(
        "mrpc.jsonl",
        "Do the two sentences say the same thing? Answer yes or no.",
        "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nAnswer:",
        {"1": " yes", "0": " no"},
    ),
    "nli": Task(
        "nli.jsonl",
        "Does the first sentence imply the second? Answer yes or no.",
        "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nAnswer:",
        {"entailment": " yes", "not_entailment": " no"},
    ),
    "rte": Task(
        "rte.jsonl",
        "Does the first sentence imply the second? Answer yes or no.",
        "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nAnswer:",
        {"0": " yes", "1": " no"},  # GLUE RTE: 0 is entailment
    ),
    "sst2": Task(
        "sst2.jsonl",
        "Is the sentiment of each movie review positive or negative?",
        "Review: {sentence}\nAnswer:",
        {"1": " positive", "0": " negative"},
    ),
}
GROUPS = ("general", "fluency", "perplexity", "representations")
STATES_FILE = "representations.safetensors"
BASELINE_FILE = "health_baseline.json"
BASELINE_SCHEMA = 1  # raised whenever what the probe measures, or how, changes: old cached baselines then miss


@dataclass
class HealthSettings:
    """examples: per general-capability task; shots: few-shot examples before each; fluency_prompts /
    fluency_tokens: how many edited prompts are continued, and how far; ppl_tokens / ppl_window: WikiText-2
    tokens scored and the window each is scored in; known: factual prompts for the representations;
    case_study: prompts shown side by side; max_chars: longer example texts are cut (keeps prompts short);
    batch_size / batch_tokens: rows per forward pass, and padded tokens per pass for the few-shot tasks (MMLU's
    long queries in full batches made a health checkpoint's peak memory)."""

    examples: int = 100
    shots: int = 2
    fluency_prompts: int = 20
    fluency_tokens: int = 50
    ppl_tokens: int = 4096
    ppl_window: int = 512
    known: int = 1000
    case_study: int = 3
    max_chars: int = 400
    seed: int = 0
    batch_size: int = 16
    batch_tokens: int = 2048

    @property
    def baseline_records(self) -> int:
        """How many of the stream's first records the unedited figures read: the edited prompts continued at
        a checkpoint are the first ``fluency_prompts`` that were edited, so twice that leaves room for rejected ones."""
        return 2 * self.fluency_prompts


# ---------------------------------------------------------------------------------------------- pure parts


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME / MEMIT's generation entropy: for each n the Shannon entropy (bits) of the text's n-gram frequencies,
    times its weight, averaged. Repetitive text scores low."""
    words = text.lower().split()
    values = []
    for n, weight in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(max(0, len(words) - n + 1)))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(weight * entropy)
    return float(np.mean(values))


def f1(labels: Sequence[str], predictions: Sequence[str], task: Task) -> float:
    """Macro F1 over the task's labels (scikit-learn). Why macro: a small model often answers a binary task with
    one label whatever the input, and the positive class's F1 is then 0 before and after any edit."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predictions, labels=list(task.labels), average="macro", zero_division=0))


def mmd(a: np.ndarray, b: np.ndarray, bandwidth: float) -> float:
    """Squared maximum mean discrepancy between two clouds with an RBF kernel (biased estimate, >= 0)."""
    from sklearn.metrics.pairwise import rbf_kernel

    gamma = 1.0 / (2 * bandwidth**2)
    value = rbf_kernel(a, a, gamma=gamma).mean() + rbf_kernel(b, b, gamma=gamma).mean()
    return float(max(value - 2 * rbf_kernel(a, b, gamma=gamma).mean(), 0.0))


def median_distance(points: np.ndarray) -> float:
    """The median pairwise Euclidean distance of a cloud: the RBF bandwidth of :func:`mmd`."""
    from sklearn.metrics import pairwise_distances

    distances = pairwise_distances(points)
    return float(np.median(distances[np.triu_indices(len(points), k=1)])) or 1.0


def mean_cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of 1 - cos(a_i, b_i) over paired rows."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.maximum(1.0 - (a * b).sum(1) / np.maximum(norms, 1e-12), 0.0)))


# ---------------------------------------------------------------------------------------------- data


def _example_fields(task_name: str, row: dict[str, Any], max_chars: int) -> dict[str, str]:
    fields = {k: (v[:max_chars] if isinstance(v, str) else v) for k, v in row.items()}
    if task_name == "mmlu":
        choices = [str(c)[:max_chars] for c in row["choices"]]
        fields.update(
            subject_name=str(row.get("subject", "")).replace("_", " "),
            choice_a=choices[0],
            choice_b=choices[1],
            choice_c=choices[2],
            choice_d=choices[3],
        )
    return fields


def _label(task_name: str, row: dict[str, Any]) -> str:
    return str(row["answer"] if task_name == "mmlu" else row["label"])


@dataclass
class TaskPrompts:
    """The evaluated examples of a task: a shared head (instruction and shots), each example's query, labels."""

    head: str
    queries: list[str]
    labels: list[str]
    neutral: str  # the query with "N/A" in every field: what the label words score without content


def task_prompts(task_name: str, rows: list[dict[str, Any]], settings: HealthSettings) -> TaskPrompts:
    """The evaluated subset of ``rows`` as few-shot prompts, and their labels (fixed by ``settings.seed``)."""
    task = TASKS[task_name]
    order = np.random.default_rng(settings.seed).permutation(len(rows)).tolist()
    evaluated = order[: settings.examples]
    pool = order[settings.examples :]
    shots, wanted = [], list(task.labels)  # one shot per label in turn, so no label is favoured
    for index in pool:
        if len(shots) >= settings.shots:
            break
        if _label(task_name, rows[index]) == wanted[len(shots) % len(wanted)]:
            shots.append(index)

    def render(row: dict[str, Any], answer: bool) -> str:
        text = task.template.format(**_example_fields(task_name, row, settings.max_chars))
        return text + task.labels[_label(task_name, row)] if answer else text

    head = task.instruction + "\n\n" + "".join(render(rows[i], True) + "\n\n" for i in shots)
    queries = [render(rows[i], False) for i in evaluated]
    fields = {name for _, name, _, _ in string.Formatter().parse(task.template) if name}
    neutral = task.template.format(**dict.fromkeys(fields, "N/A"))
    return TaskPrompts(head, queries, [_label(task_name, rows[i]) for i in evaluated], neutral)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def health_folder(data_dir: str | None) -> Path:
    folder = data_folder(data_dir)
    if folder is None:
        raise FileNotFoundError(
            "--health needs the data folder (--data or $DELTAEDIT_DATA) with general/, wikitext-2/ and known/"
        )
    return Path(folder)


# ---------------------------------------------------------------------------------------------- model parts


@torch.no_grad()
def label_scores(model, parts: ModelParts, tokenizer, queries: Sequence[str], words: Sequence[str], head: str = "",
                 batch_size: int = 16, batch_tokens: int = 2048) -> torch.Tensor:  # fmt: skip
    """For each ``head + query`` (rows), the log-probability of each label word's first token right after it.

    The head (instruction and shots, shared by every query) runs once into a key-value cache; each batch of
    queries (at most ``batch_size`` rows and ``batch_tokens`` padded tokens, head included) runs on a copy
    of it. Head and query are tokenized apart and joined as ids."""
    from .hooks import cache_of, with_cache

    firsts = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in words]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"label words {list(words)} share a first token; choose words that differ at once")
    device = input_device(model)
    base = model.base_model
    head_ids = tokenizer(head)["input_ids"] if head else []
    ids = [tokenizer(q, add_special_tokens=not head_ids)["input_ids"] for q in queries]
    cache = None
    if head_ids:
        cache = cache_of(base(input_ids=torch.tensor([head_ids], device=device), use_cache=True))
    out = torch.zeros(len(ids), len(firsts))
    for chunk in length_batches([len(x) for x in ids], batch_size, batch_tokens, shared=len(head_ids)):
        batch = pad([ids[i] for i in chunk], pad_id(tokenizer), device)
        rows = torch.arange(len(chunk), device=device)
        if cache is None:
            logits = logits_at(model, parts, batch.inputs(), rows, batch.lengths - 1)
        else:
            shared = copy.deepcopy(cache)
            shared.batch_repeat_interleave(len(chunk))
            width = batch.input_ids.shape[1]
            seen = torch.ones(len(chunk), len(head_ids), dtype=batch.attention_mask.dtype, device=device)
            hidden = base(
                input_ids=batch.input_ids,
                attention_mask=torch.cat([seen, batch.attention_mask], dim=1),
                position_ids=(len(head_ids) + torch.arange(width, device=device)).expand(len(chunk), width),
                **with_cache(base, shared),
                use_cache=True,
            ).last_hidden_state
            logits = final_logits(model, parts, hidden[rows, batch.lengths - 1])
        out[chunk] = torch.log_softmax(logits.float(), dim=-1)[:, firsts].cpu()
    return out


def label_predictions(scores: torch.Tensor, neutral: torch.Tensor | None = None) -> list[int]:
    """The label each row of ``scores`` chooses, after subtracting the content-free row ``neutral`` if given."""
    if neutral is not None:
        scores = scores - neutral
    return scores.argmax(-1).tolist()


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], n_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations (text, prompt excluded), batched with left padding and a key-value cache."""
    device = input_device(model)
    out: list[str] = []
    for begin in range(0, len(prompts), batch_size):
        ids = [tokenizer(p)["input_ids"] for p in prompts[begin : begin + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad_id(tokenizer), dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=n_tokens,
            do_sample=False,
            pad_token_id=pad_id(tokenizer),
        )
        out += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return out


@torch.no_grad()
def perplexity(
    model, parts: ModelParts, tokenizer, text: str, n_tokens: int, window: int, batch_size: int = 2, chunk: int = 256
) -> float:
    """exp(mean NLL) of the first ``n_tokens`` tokens of ``text``, scored in non-overlapping windows.

    The unembedding runs on ``chunk`` positions at a time: a window's logits over the whole vocabulary
    (and their log-softmax) would be the largest allocation of a health checkpoint."""
    ids = first_tokens(tokenizer, text, n_tokens)
    windows = [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
    device = input_device(model)
    total, count = 0.0, 0
    for begin in range(0, len(windows), batch_size):
        batch = pad(windows[begin : begin + batch_size], pad_id(tokenizer), device)
        hidden = model.base_model(**batch.inputs(), use_cache=False).last_hidden_state[:, :-1]
        rows, cols = torch.nonzero(batch.attention_mask[:, 1:], as_tuple=True)
        targets = batch.input_ids[:, 1:][rows, cols]
        for start in range(0, len(rows), chunk):
            part = slice(start, start + chunk)
            logits = final_logits(model, parts, hidden[rows[part], cols[part]]).float()
            total += float(torch.nn.functional.cross_entropy(logits, targets[part], reduction="sum"))
        count += len(rows)
    return math.exp(total / max(count, 1))


@torch.no_grad()
def hidden_states(model, tokenizer, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 32):
    """Block outputs at each prompt's last token, per layer: {layer: (n, d_model) float32 CPU}."""
    states: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    device = input_device(model)
    for begin in range(0, len(prompts), batch_size):
        ids = [tokenizer(p)["input_ids"] for p in prompts[begin : begin + batch_size]]
        batch = pad(ids, pad_id(tokenizer), device)
        out = model.base_model(**batch.inputs(), output_hidden_states=True, use_cache=False)  # no unembedding
        rows = torch.arange(len(ids), device=device)
        for layer in layers:
            states[layer].append(out.hidden_states[layer + 1][rows, batch.lengths - 1].float().cpu())
    return {layer: torch.cat(chunks) for layer, chunks in states.items()}


# ---------------------------------------------------------------------------------------------- the probe


def probed_layers(critical_layer: int, n_layers: int) -> list[int]:
    """The layers whose representations a run compares: the critical layer, where the edits write, and the last,
    what the unembedding reads."""
    return sorted({critical_layer, n_layers - 1})


class HealthProbe:
    """Everything model health measures, read from the data folder once; ``measure`` on the model as it is."""

    def __init__(self, tokenizer, data_dir: str | None, layers: Sequence[int], settings: HealthSettings | None = None):
        self.settings = settings or HealthSettings()
        self.tokenizer = tokenizer
        self.layers = list(layers)
        folder = health_folder(data_dir)
        self.tasks = {
            name: task_prompts(name, _read_jsonl(folder / "general" / task.file), self.settings)
            for name, task in TASKS.items()
        }
        self.wikitext = (folder / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
        known = json.loads((folder / "known" / "known_1000.json").read_text(encoding="utf-8"))
        self.known_prompts = [row["prompt"] for row in known[: self.settings.known]]

    def fluency_prompts(self, records: Sequence[EditRecord], count: int | None = None) -> list[str]:
        return [r.request.text for r in records[: count or self.settings.fluency_prompts]]

    def general(self, model, parts) -> dict[str, float]:
        out = {}
        for name, prompts in self.tasks.items():
            task = TASKS[name]
            words, values = list(task.labels.values()), list(task.labels)
            scores = label_scores(
                model,
                parts,
                self.tokenizer,
                [*prompts.queries, prompts.neutral],
                words,
                prompts.head,
                self.settings.batch_size,
                self.settings.batch_tokens,
            )
            chosen = label_predictions(scores[:-1], scores[-1])
            out[name] = f1(prompts.labels, [values[i] for i in chosen], task)
        return out

    def generations(self, model, records: Sequence[EditRecord], count: int | None = None) -> dict[str, str]:
        prompts = self.fluency_prompts(records, count)
        texts = generate(model, self.tokenizer, prompts, self.settings.fluency_tokens, self.settings.batch_size)
        return dict(zip(prompts, texts, strict=True))

    def wikitext_perplexity(self, model, parts) -> float:
        s = self.settings
        return perplexity(model, parts, self.tokenizer, self.wikitext, s.ppl_tokens, s.ppl_window)

    def states(self, model) -> dict[int, torch.Tensor]:
        return hidden_states(model, self.tokenizer, self.known_prompts, self.layers, self.settings.batch_size)

    def measure(self, model, parts, records: Sequence[EditRecord], count: int | None = None) -> dict[str, Any]:
        """The raw figures of the model as it is now: F1 per task, generations, perplexity, hidden states."""
        return {
            "general": self.general(model, parts),
            "generations": self.generations(model, records, count),
            "perplexity": self.wikitext_perplexity(model, parts),
            "states": self.states(model),
        }

    def compare(self, now: dict[str, Any], base: dict[str, Any], records: Sequence[EditRecord]) -> dict[str, Any]:
        """The checkpoint groups of metrics.json: ``now`` against the unedited ``base`` (both from ``measure``;
        ``base`` holds the unedited generations of the same prompts and the bandwidths)."""
        general = {
            "f1": now["general"],
            "unedited": base["general"],
            "delta": {k: now["general"][k] - base["general"][k] for k in now["general"]},
        }
        general["mean_delta"] = float(np.mean(list(general["delta"].values())))
        targets = {r.request.text: r.request.target_new.strip().lower() for r in records}
        compared = [p for p in now["generations"] if p in base["generations"]]  # prompts the unedited model saw
        edited = [now["generations"][p] for p in compared]
        unedited = [base["generations"][p] for p in compared]
        fluency = {
            "entropy": float(np.mean([ngram_entropy(g) for g in edited])) if edited else None,
            "entropy_unedited": float(np.mean([ngram_entropy(g) for g in unedited])) if unedited else None,
            "mentions_target": float(np.mean([targets[p] in now["generations"][p].lower() for p in compared]))
            if compared
            else None,
            "n_prompts": len(compared),
        }
        representations = {}
        for layer in self.layers:
            a, b = base["states"][layer].numpy(), now["states"][layer].numpy()
            representations[str(layer)] = {
                "cosine_distance": mean_cosine_distance(a, b),
                "mmd": mmd(a, b, base["bandwidths"][layer]),
            }
        case_study = [
            {"prompt": p, "unedited": base["generations"][p], "edited": now["generations"][p]}
            for p in compared[: self.settings.case_study]
        ]
        return {
            "general": general,
            "fluency": fluency,
            "perplexity": {
                "wikitext2": now["perplexity"],
                "unedited": base["perplexity"],
                "tokens": self.settings.ppl_tokens,
            },
            "representations": representations,
            "case_study": case_study,
        }

    def baseline_key(self, model_fingerprint: str, device: torch.device, records: Sequence[EditRecord]) -> str:
        """What the unedited figures depend on, hashed: the weights, the tokenizer's vocabulary, the device kind,
        the settings, the layers, every text the probe reads, and the code that measures (this package's, torch's
        and transformers' versions, BASELINE_SCHEMA). Runs with one key share one measured baseline; it matches a
        fresh measurement up to the float noise of thread counts and device models within one device kind."""
        import transformers

        from . import __version__

        texts = {name: asdict(prompts) for name, prompts in self.tasks.items()}
        vocabulary = json.dumps(sorted(self.tokenizer.get_vocab().items())).encode()
        parts = [
            BASELINE_SCHEMA,
            __version__,
            torch.__version__,
            transformers.__version__,
            type(self.tokenizer).__name__,
            hashlib.sha256(vocabulary).hexdigest(),
            model_fingerprint,
            device.type,
            asdict(self.settings),
            self.layers,
            texts,
            self.wikitext,
            self.known_prompts,
            self.fluency_prompts(records, self.settings.baseline_records),
        ]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]

    def baseline(self, model, parts, records: Sequence[EditRecord]) -> dict[str, Any]:
        """``measure`` on the unedited model, with the RBF bandwidth of each layer's cloud."""
        base = self.measure(model, parts, records, self.settings.baseline_records)
        base["bandwidths"] = {layer: median_distance(base["states"][layer].numpy()) for layer in self.layers}
        return base


def save_baseline(base: dict[str, Any], run_dir: Path, settings: HealthSettings) -> None:
    from safetensors.torch import save_file

    from .ledger import contained, write_atomic

    data = {k: v for k, v in base.items() if k != "states"}
    data["bandwidths"] = {str(k): v for k, v in base["bandwidths"].items()}
    data["settings"] = asdict(settings)
    write_atomic(contained(run_dir, BASELINE_FILE), json.dumps(data).encode())
    states = {f"unedited.{k}": v.contiguous() for k, v in base["states"].items()}
    path = contained(run_dir, STATES_FILE)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(states, str(tmp))
    tmp.replace(path)  # a reader (another run sharing the cache) never sees half a file


def load_baseline(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from .ledger import contained

    data = json.loads(contained(run_dir, BASELINE_FILE).read_text())
    data["bandwidths"] = {int(k): v for k, v in data["bandwidths"].items()}
    tensors = load_file(str(contained(run_dir, STATES_FILE)))
    data["states"] = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("unedited.")}
    return data


def cache_baseline(base: dict[str, Any], folder: Path, settings: HealthSettings) -> None:
    """Keep a measured baseline in the cache folder ``folder``: written whole into a folder of its own, then renamed
    into place, so runs measuring the same key at once never read or write each other's half files."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_baseline(base, staging, settings)
        staging.rename(folder)  # fails when another run got there first: its copy is as good as ours
    except OSError:
        if not (folder / BASELINE_FILE).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_cached_baseline(folder: Path) -> dict[str, Any] | None:
    """A baseline kept in the cache, or None when there is none or it cannot be read (then it is measured again)."""
    from safetensors import SafetensorError

    from .ledger import LedgerError

    if not (folder / BASELINE_FILE).is_file():
        return None
    try:
        return load_baseline(folder)
    except (OSError, ValueError, KeyError, SafetensorError, LedgerError):
        return None


def save_states(run_dir: Path, states: dict[int, torch.Tensor], n_edits: int) -> None:
    """Keep the latest edited states beside the unedited ones (for the t-SNE picture of the report)."""
    from safetensors.torch import load_file, save_file

    from .ledger import contained

    path = contained(run_dir, STATES_FILE)
    tensors = {k: v for k, v in load_file(str(path)).items() if k.startswith("unedited.")}
    tensors.update({f"edited.{k}": v.contiguous() for k, v in states.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"n_edits": str(n_edits)})
    tmp.replace(path)
