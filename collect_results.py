"""One table across linear-probing runs: rows are encoder x dataset x training subset, columns are heads.

    python collect_results.py output_dir/mae-flowers output_dir/mae-flowers-5shot ... [--format md|csv]

Each OUTPUT_DIR of main_linprobe.py holds run.json (its resolved configuration and identity) and, once finished,
results.json. A cell is the head's best val acc1 over the run's lrs (the CSV adds that probe's lr and epoch;
k-NN columns take the best k and temperature). Runs that share a row fill its cells together; a run whose heads
are already filled in that row opens another row, and the last column names the runs behind each row. A folder
that is missing, unfinished (no results.json, or fewer logged epochs than configured) or not a run is listed
under the table (on stderr with --format csv, so the CSV stays parseable), never dropped silently.
"""
import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from util.cli import run as run_cli
from util.errors import UserError
from util.run_state import LOG, RESULTS, RUN_INFO
from util.subsets import TrainSubset

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".safetensors", ".ckpt")
KEY_COLUMNS = ("encoder", "dataset", "train subset")


def get_args_parser():
    p = argparse.ArgumentParser("One table of best accuracies across main_linprobe.py runs")
    p.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="output folders of main_linprobe.py runs")
    p.add_argument("--format", choices=["md", "csv"], default="md", help="Markdown table or CSV (default: md)")
    return p


class NotCollected(Exception):
    """A folder without a finished run; the message says why."""


@dataclass
class Run:
    source: str  # the folder as given on the command line
    key: tuple  # (encoder, dataset, train subset)
    best: dict  # head -> {"acc1", "lr", "epoch"}


# ------------------------------------------------------------------------------------------- one run

def encoder_name(config, identity):
    """Checkpoint file stem, timm name, or 'random <model>' for a random-initialised encoder."""
    encoder = config["encoder"]
    if not encoder.get("finetune"):
        return f"random {encoder['model']}"
    source = str(identity.get("encoder") or encoder["finetune"])
    match = re.match(r"^(.+) \(\d+ bytes, sha256 [0-9a-f]+\)$", source)  # util.run_state.fingerprint of a file
    if not match:
        return source  # a timm pretrained name, e.g. vit_base_patch16_224.mae
    name = match.group(1)
    while Path(name).suffix in CHECKPOINT_SUFFIXES and Path(name).stem:
        name = Path(name).stem
    return name


def dataset_name(data_path):
    """'digits', 'flowers102' (also for 'flowers102:/root'), or the folder's name for an ImageFolder root."""
    name = str(data_path).partition(":")[0]
    if "/" not in name:
        return name
    return Path(str(data_path).rstrip("/")).name


def subset_name(subset):
    return "full" if subset is None else TrainSubset(**subset).label


def logged_epochs(folder):
    path = folder / LOG
    if not path.exists():
        return 0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return len({r["epoch"] for r in records if "epoch" in r})


def best_per_head(rows):
    """head -> the row with its best acc1 (first of equals), as {"acc1", "lr", "epoch"}."""
    best = {}
    for row in rows:
        head = row["head"]
        if head not in best or row["best_acc1"] > best[head]["acc1"]:
            best[head] = {"acc1": row["best_acc1"], "lr": row["lr"], "epoch": row["best_epoch"]}
    return best


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
        config, identity = info["config"], info["identity"]
        epochs = config["schedule"]["epochs"]
        done = logged_epochs(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NotCollected(f"{RUN_INFO} or {LOG} cannot be read ({type(err).__name__}: {err})") from None
    if not (folder / RESULTS).exists() or done < epochs:
        raise NotCollected(f"unfinished ({done} of {epochs} epochs logged"
                           f"{'' if (folder / RESULTS).exists() else f', no {RESULTS}'})")
    try:
        best = best_per_head(json.loads((folder / RESULTS).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NotCollected(f"{RESULTS} cannot be read ({type(err).__name__}: {err})") from None
    key = (encoder_name(config, identity), dataset_name(config["data_path"]), subset_name(config.get("train_subset")))
    return Run(source, key, best)


# ------------------------------------------------------------------------------------------- the table

@dataclass
class Row:
    key: tuple
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


def head_columns(runs):
    return list(dict.fromkeys(head for run in runs for head in run.best))


def markdown(rows, heads):
    columns = [*KEY_COLUMNS, *heads, "runs"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row.cells[h]['acc1']:.2f}" if h in row.cells else "-" for h in heads]
        lines.append("| " + " | ".join([*row.key, *cells, ", ".join(row.sources)]) + " |")
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
        writer.writerow([*row.key, *cells, ", ".join(row.sources)])
    return out.getvalue().rstrip("\n")


def _blank(value):
    return "" if value is None else value


# ------------------------------------------------------------------------------------------- entry point

def main(args):
    runs, skipped = [], []
    for source in args.output_dirs:
        try:
            runs.append(read_run(source))
        except NotCollected as err:
            skipped.append(f"{source}: {err}")
    if not runs:
        shown = "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        raise UserError(f"none of the {len(skipped)} folder(s) holds a finished run: {shown} (pass the "
                        "--output_dir of finished main_linprobe.py runs)")
    rows, heads = table_rows(runs), head_columns(runs)
    if args.format == "csv":
        print(csv_text(rows, heads))
        for line in skipped:
            print(f"note: not in the table: {line}", file=sys.stderr)
        return
    print(markdown(rows, heads))
    if skipped:
        print("\nNot in the table:\n" + "\n".join(f"- {line}" for line in skipped))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
