"""One table across linear-probing runs: a row per experiment (encoder, the tokens read, dataset, training subset),
a column per head.

    python collect_results.py output_dir/mae-flowers output_dir/mae-flowers-5shot ... [--format md|csv]

Each OUTPUT_DIR of main_linprobe.py holds run.json (its resolved configuration and identity) and, once finished,
results.json. A cell is the head's best val acc1 over the run's lrs (the CSV adds that probe's lr and epoch;
k-NN columns take the best k and temperature). A row's key is everything that makes another experiment: the
encoder (its file's name and content), sub-model, input size, block and final norm, the dataset and the training
subset; the Markdown table shows the key columns that differ between the runs given (the CSV all of them). Runs
that share a key fill its row together; a run whose heads are already filled in that row opens another row, and
the last column names the runs behind each row. A folder that is missing, unfinished (no results.json, or fewer
logged epochs than configured), not a run or unreadable is listed under the table (on stderr with --format csv,
so the CSV stays parseable), never dropped silently and never fatal; notes (a folder given twice, a result that is
not a number, rows that repeat each other) are listed the same way.
"""
import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cli import run as run_cli
from util.checkpoint import CHECKPOINT_SUFFIXES
from util.errors import UserError
from util.run_state import LOG, RESULTS, RUN_INFO, as_fingerprint
from util.subsets import TrainSubset

# Every column of a row's key, in the order shown. The Markdown table leaves out those all runs agree on, except
# the first and the last two; "encoder sha256" is shown in the encoder column when one name has two contents.
KEY_COLUMNS = ("encoder", "encoder sha256", "sub-model", "input size", "block", "final norm", "dataset",
               "train subset")
ALWAYS_SHOWN = ("encoder", "dataset", "train subset")


def get_args_parser():
    p = argparse.ArgumentParser("One table of best accuracies across main_linprobe.py runs")
    p.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="output folders of main_linprobe.py runs")
    p.add_argument("--format", choices=["md", "csv"], default="md", help="Markdown table or CSV (default: md)")
    return p


class NotCollected(Exception):
    """A folder without a finished, readable run; the message says why."""


@dataclass
class Run:
    source: str  # the folder as given on the command line
    key: dict  # KEY_COLUMNS -> str
    best: dict  # head -> {"acc1", "lr", "epoch"}
    notes: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------- one run

def value_at(data, path, kinds, *, default=KeyError, where=RUN_INFO, within=""):
    """data[a][b]... for path "a.b...", of one of the types `kinds`, or NotCollected naming the field as
    `within` + path (or `default` when the field is absent and a default is given: older run.json files lack
    some)."""
    value = data
    keys = path.split(".")
    for depth, key in enumerate(keys):
        if not isinstance(value, dict):
            raise NotCollected(f"{where} cannot be read: {within}{'.'.join(keys[:depth])} is {_shown(value)}, "
                               "not an object")
        if key not in value:
            if default is not KeyError:
                return default
            raise NotCollected(f"{where} cannot be read: it has no {within}{path}")
        value = value[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in _as_tuple(kinds))
        raise NotCollected(f"{where} cannot be read: {within}{path} is {_shown(value)}, not {names}")
    return value


def _as_tuple(kinds):
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _shown(value):
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def encoder_name(finetune, model, recorded):
    """Checkpoint file stem, timm name, or 'random <model>' for a random-initialised encoder; and the file's
    SHA-256 ('' for no file). `recorded`: the identity's encoder (util.run_state.fingerprint, or its older prose)."""
    if not finetune:
        return f"random {model}", ""
    recorded = as_fingerprint(recorded)
    if not isinstance(recorded, dict):
        return str(recorded or finetune), ""  # a timm pretrained name, e.g. vit_base_patch16_224.mae
    name = str(recorded.get("name", finetune))
    while Path(name).suffix in CHECKPOINT_SUFFIXES and Path(name).stem:
        name = Path(name).stem
    return name, str(recorded.get("sha256", ""))


def dataset_name(data_path):
    """'digits', 'flowers102' (also for 'flowers102:/root'), or the folder's name for an ImageFolder root."""
    name = str(data_path).partition(":")[0]
    if "/" not in name:
        return name
    return Path(str(data_path).rstrip("/")).name


def subset_name(subset):
    if subset is None:
        return "full"
    if not isinstance(subset, dict):
        raise NotCollected(f"{RUN_INFO} cannot be read: config.train_subset is {_shown(subset)}, not an object")
    try:
        return TrainSubset(**subset).label
    except (TypeError, ValueError) as err:
        raise NotCollected(f"{RUN_INFO} cannot be read: config.train_subset {_shown(subset)} ({err})") from None


def logged_epochs(folder):
    path = folder / LOG
    if not path.exists():
        return 0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return len({r["epoch"] for r in records if isinstance(r, dict) and "epoch" in r})


def run_key(config, identity):
    """KEY_COLUMNS -> str of one run: what makes its experiment another one. The identity (what a checkpoint of
    the run records) decides; its configuration fills in what an older identity lacks."""
    encoder = value_at(config, "encoder", dict, within="config.")
    finetune = value_at(encoder, "finetune", str, default="", within="config.encoder.")
    model = value_at(identity, "model", str, default=None, within="identity.") or value_at(
        encoder, "model", str, within="config.encoder.")
    recorded = value_at(identity, "encoder", (str, dict, type(None)), default=None, within="identity.")
    name, sha256 = encoder_name(finetune, model, recorded)

    def setting(key, kinds):
        fallback = value_at(encoder, key, kinds, default=None, within="config.encoder.")
        return value_at(identity, key, kinds, default=fallback, within="identity.")

    sub_model = setting("checkpoint_key", (str, type(None)))
    input_size = setting("input_size", (int, type(None)))
    block = setting("return_block", (int, type(None)))
    final_norm = setting("final_norm", (bool, type(None)))
    return {"encoder": name, "encoder sha256": sha256, "sub-model": sub_model or "default",
            "input size": "" if input_size is None else str(input_size),
            "block": "last" if block is None else str(block), "final norm": "on" if final_norm else "off",
            "dataset": dataset_name(value_at(config, "data_path", str, within="config.")),
            "train subset": subset_name(config.get("train_subset"))}


def best_per_head(rows):
    """(head -> the row with its best acc1 (first of equals) as {"acc1", "lr", "epoch"}, notes on rows left out or
    repeated). A result that is not a finite number is left out with a note."""
    best, notes, seen = {}, [], set()
    if not isinstance(rows, list):
        raise NotCollected(f"{RESULTS} cannot be read: it holds {_shown(rows)}, not a list of rows")
    for i, row in enumerate(rows):
        head = value_at(row, "head", str, where=f"{RESULTS} row {i}")
        acc1 = value_at(row, "best_acc1", (int, float), where=f"{RESULTS} row {i}")
        probe = row.get("probe", head)
        if not math.isfinite(acc1):
            notes.append(f"{RESULTS}: probe {probe} has best acc1 {acc1}, left out")
            continue
        if probe in seen:
            notes.append(f"{RESULTS}: probe {probe} is listed more than once")
        seen.add(probe)
        if head not in best or acc1 > best[head]["acc1"]:
            best[head] = {"acc1": acc1, "lr": row.get("lr"), "epoch": row.get("best_epoch")}
    return best, notes


def read_run(source):
    """The Run in folder `source`, or NotCollected saying why it has none."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise NotCollected("missing (no such folder)")
    if not (folder / RUN_INFO).exists():
        raise NotCollected(f"no {RUN_INFO} (not an output folder of main_linprobe.py, or one written before "
                           f"{RUN_INFO} existed)")
    try:
        info = json.loads((folder / RUN_INFO).read_text())
        config = value_at(info, "config", dict)
        identity = value_at(info, "identity", dict)
        epochs = value_at(config, "schedule.epochs", int, within="config.")
        key = run_key(config, identity)
        done = logged_epochs(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise NotCollected(f"{RUN_INFO} or {LOG} cannot be read ({type(err).__name__}: {err})") from None
    if not (folder / RESULTS).exists() or done < epochs:
        raise NotCollected(f"unfinished ({done} of {epochs} epochs logged"
                           f"{'' if (folder / RESULTS).exists() else f', no {RESULTS}'})")
    try:
        best, notes = best_per_head(json.loads((folder / RESULTS).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise NotCollected(f"{RESULTS} cannot be read ({type(err).__name__}: {err})") from None
    if not best:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise NotCollected(f"{RESULTS} holds no accuracy that is a number{why}")
    return Run(source, key, best, [f"{source}: {note}" for note in notes])


# ------------------------------------------------------------------------------------------- the table

@dataclass
class Row:
    key: dict
    cells: dict = field(default_factory=dict)  # head -> {"acc1", "lr", "epoch"}
    sources: list = field(default_factory=list)


def table_rows(runs):
    """Rows in the order their first run was given; a run joins the first row of its key with none of its heads."""
    rows = []
    for run in runs:
        row = next((r for r in rows if r.key == run.key and not r.cells.keys() & run.best.keys()), None)
        if row is None:
            row = Row(run.key)
            rows.append(row)
        row.cells.update(run.best)
        row.sources.append(run.source)
    return rows


def repeated_rows(rows):
    """Notes on rows with the same key and the same numbers: most likely one run copied, counted twice."""
    notes, reported = [], set()
    for i, row in enumerate(rows):
        for j in range(i + 1, len(rows)):
            if j not in reported and rows[j].key == row.key and _numbers(rows[j]) == _numbers(row):
                reported.add(j)
                notes.append(f"rows {i + 1} and {j + 1} hold the same experiment and the same numbers (one run "
                             f"copied?): {', '.join(row.sources)} and {', '.join(rows[j].sources)}")
    return notes


def _numbers(row):
    return {head: cell["acc1"] for head, cell in row.cells.items()}


def head_columns(runs):
    return list(dict.fromkeys(head for run in runs for head in run.best))


def shown_key_columns(rows):
    """The key columns of the Markdown table: those the rows do not all agree on, and encoder/dataset/subset."""
    return [c for c in KEY_COLUMNS if c != "encoder sha256" and
            (c in ALWAYS_SHOWN or len({row.key[c] for row in rows}) > 1)]


def encoder_label(row, rows):
    """The encoder's name, with its SHA-256 when another row has an encoder of that name with other contents."""
    name, digest = row.key["encoder"], row.key["encoder sha256"]
    if digest and any(r.key["encoder"] == name and r.key["encoder sha256"] != digest for r in rows):
        return f"{name} (sha256 {digest[:8]})"
    return name


def markdown(rows, heads):
    keys = shown_key_columns(rows)
    columns = [*keys, *heads, "runs"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        key = [encoder_label(row, rows) if c == "encoder" else row.key[c] for c in keys]
        cells = [f"{row.cells[h]['acc1']:.2f}" if h in row.cells else "-" for h in heads]
        lines.append("| " + " | ".join([*key, *cells, ", ".join(row.sources)]) + " |")
    return "\n".join(lines)


def csv_text(rows, heads):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*KEY_COLUMNS, *(f"{h} {part}" for h in heads for part in ("acc1", "lr", "epoch")), "runs"])
    for row in rows:
        cells = []
        for h in heads:
            cell = row.cells.get(h)
            cells += ["", "", ""] if cell is None else [cell["acc1"], _blank(cell["lr"]), _blank(cell["epoch"])]
        writer.writerow([*(row.key[c] for c in KEY_COLUMNS), *cells, ", ".join(row.sources)])
    return out.getvalue().rstrip("\n")


def _blank(value):
    return "" if value is None else value


# ------------------------------------------------------------------------------------------- entry point

def collect(sources):
    """(runs, folders not collected with why, notes), each folder read once."""
    runs, skipped, notes, seen = [], [], [], {}
    for source in sources:
        folder = Path(source).expanduser()
        real = folder.resolve() if folder.is_dir() else None
        if real is not None and real in seen:
            notes.append(f"{source}: the same folder as {seen[real]}, collected once")
            continue
        try:
            run = read_run(source)
        except NotCollected as err:
            skipped.append(f"{source}: {err}")
            continue
        seen[real] = source
        runs.append(run)
        notes += run.notes
    return runs, skipped, notes


def main(args):
    runs, skipped, notes = collect(args.output_dirs)
    if not runs:
        shown = "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        raise UserError(f"none of the {len(skipped)} folder(s) holds a finished run: {shown} (pass the "
                        "--output_dir of finished main_linprobe.py runs)")
    rows, heads = table_rows(runs), head_columns(runs)
    notes += repeated_rows(rows)
    if args.format == "csv":
        print(csv_text(rows, heads))
        for line in skipped:
            print(f"note: not in the table: {line}", file=sys.stderr)
        for line in notes:
            print(f"note: {line}", file=sys.stderr)
        return
    print(markdown(rows, heads))
    if skipped:
        print("\nNot in the table:\n" + "\n".join(f"- {line}" for line in skipped))
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {line}" for line in notes))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
