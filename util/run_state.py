"""A run's state on disk: the locked output folder, the experiment's identity, resume, best epochs, checkpoints.

A checkpoint records what defines the experiment (`identity`: encoder file and its checksum, data root, training
subset and class names, input size, heads, lrs, schedule, seed...). Auto-resume continues only an identical
experiment; an explicit resume may change settings but never the heads' structure. Checkpoints are written whole
or not at all, and log.txt never holds an epoch that the last checkpoint does not.

Library code: problems are ValueError / OSError with plain messages; `IdentityMismatch` says which setting
differs, and the entry point words the remedy.
"""
import fcntl
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from util.checkpoint import load_checkpoint, save_atomic, write_json_atomic, write_text_atomic

CHECKPOINT_FORMAT = "beyond-cls linear probing"
CHECKPOINT_VERSION = 2
LAST, BEST, LOCK, LOG = "checkpoint-last.pth", "checkpoint-best.pth", ".lock", "log.txt"
RUN_INFO, SUBSET_LIST, RESULTS = "run.json", "train_subset.txt", "results.json"
RUN_INFO_VERSION = 1


class OutputDirBusy(RuntimeError):
    """Another process holds the output folder's lock."""


class IdentityMismatch(ValueError):
    """A checkpoint of another experiment: `setting` is the first that differs."""

    def __init__(self, path, setting, saved, current):
        self.path, self.setting, self.saved, self.current = path, setting, saved, current
        super().__init__(f"{path} was saved with {setting}={saved!r}, this run has {setting}={current!r}")


# ------------------------------------------------------------------------------------------- output folder

def prepare_output_dir(path):
    """Create the folder if needed and prove it is writable; never touches what is already there."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output dir {path} is a file and cannot be written")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(f"output dir {path} cannot be written: {err.strerror or type(err).__name__}") from None
    return path


class OutputLock:
    """An exclusive lock on the output folder for as long as a run writes there.

    The lock is flock() on the folder itself, so the kernel drops it when the process ends, even by a kill;
    OUTPUT_DIR/.lock only names the holder's PID for a refused run's message, and is removed on release.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.pid_file = self.folder / LOCK
        self.fd = None

    def acquire(self):
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.pid_file.read_text().strip() if self.pid_file.exists() else "unknown"
            raise OutputDirBusy(f"output dir {self.folder} is in use by another run (PID {holder})") from None
        self.fd = fd
        self.pid_file.write_text(f"{os.getpid()}\n")
        for stale in self.folder.glob(".checkpoint-*.pth.*.tmp"):  # of a writer killed mid-save; we are the writer
            stale.unlink(missing_ok=True)
        return self

    def release(self):
        if self.fd is not None:
            self.pid_file.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ------------------------------------------------------------------------------------------------ identity

def fingerprint(source):
    """What identifies an encoder source: a file's name, size and SHA-256 (a copy or a move stays the same
    experiment, an overwritten file does not); a timm name or random init as itself."""
    if not source:
        return "random init"
    path = Path(source).expanduser()
    if not path.is_file():
        return str(source)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return f"{path.name} ({path.stat().st_size} bytes, sha256 {digest.hexdigest()[:16]})"


def data_root(data_path):
    """Built-in names stay names; folders become absolute paths (the same folder reached another way matches)."""
    name, _, root = str(data_path).partition(":")
    if Path(data_path).expanduser().exists():
        return str(Path(data_path).expanduser().resolve())
    return f"{name}:{Path(root).expanduser().resolve()}" if root else name


def experiment_identity(config, *, encoder_source, oracle_source, classes, nb_classes, train_subset="full"):
    """The settings that define a linear-probing experiment, in the order a difference is reported.

    train_subset: util.subsets.Selection.describe() of the training images (its label, size and the hash of
    train_subset.txt), or "full". Another subset is another experiment: auto-resume refuses it, an explicit
    --resume continues with it (the heads' structure does not depend on it, so it is not in STRUCTURE)."""
    enc = config.encoder
    return {
        "model": enc.model,
        "encoder": encoder_source,
        "checkpoint_key": enc.checkpoint_key,
        "input_size": enc.input_size,
        "return_block": enc.return_block,
        "final_norm": enc.final_norm,
        "oracle": oracle_source,
        "data": data_root(config.data_path),
        "train_subset": train_subset,
        "classes": list(classes),
        "nb_classes": nb_classes,
        "augment": config.augment,
        "decoder": config.decoder,  # --decoder fast/gpu: the same crops, pixels within resampling tolerance
        "probes": {p.name: p.head for p in config.probes},
        "lrs": {p.name: p.lr for p in config.probes},
        "head_options": asdict(config.head_options),
        "optimizer": config.optimizer,
        "weight_decay": config.weight_decay,
        "effective_batch": config.effective_batch,
        "epochs": config.schedule.epochs,
        "warmup_epochs": config.schedule.warmup_epochs,
        "min_lr": config.schedule.min_lr,
        "seed": config.seed,
        "amp": config.amp,
    }


# What the heads were trained on and for: no resume, explicit or not, may change it.
STRUCTURE = ("probes", "nb_classes", "classes", "model", "head_options", "return_block", "final_norm")


def first_difference(saved, current, keys):
    """The first of `keys` that `saved` records with another value than `current` (keys it lacks are unknown)."""
    return next((key for key in keys if key in saved and saved[key] != current.get(key)), None)


# ------------------------------------------------------------------------------------------------ run state

def load_heads(path):
    """A checkpoint of main_linprobe.py (it holds probe heads), or ValueError."""
    checkpoint = load_checkpoint(path)
    if "probes" not in checkpoint:
        raise ValueError(f"{path} holds no probe heads; it is not a checkpoint of main_linprobe.py")
    return checkpoint


def lock_output_dir(output_dir):
    """prepare_output_dir, then the folder's OutputLock, acquired (OSError, or OutputDirBusy naming the holder)."""
    prepare_output_dir(output_dir)
    return OutputLock(output_dir).acquire()


class RunState:
    """Best acc1 per probe (with the heads' weights at that epoch), the epoch to start from, and the files.

    `classes` are the training data's class names; `identity` the experiment's settings (experiment_identity).
    """

    def __init__(self, output_dir, identity, probe_names):
        self.output_dir = Path(output_dir)
        self.identity = identity
        self.best = {name: {"acc1": -1.0, "epoch": -1} for name in probe_names}
        self.best_states = {}
        self.start_epoch = 0

    # -- resume

    def auto_resume_path(self):
        path = self.output_dir / LAST
        return str(path) if path.exists() else ""

    def read(self, path, *, explicit):
        """The checkpoint at `path` if it may continue this experiment. Auto-resume (explicit False) needs the same
        identity; an explicit one the same head structure. Returns (checkpoint, changed settings)."""
        checkpoint = load_heads(path)
        saved = checkpoint.get("identity")
        if saved is None:  # written before identities were recorded (version 1): only its structure is known
            legacy = checkpoint.get("config", {})
            saved = {"probes": legacy.get("probes"), "nb_classes": legacy.get("nb_classes"),
                     "model": legacy.get("model"), "head_options": legacy.get("head_options"),
                     "return_block": legacy.get("return_block"), "final_norm": legacy.get("final_norm")}
            if not explicit:
                raise IdentityMismatch(path, "identity", "not recorded (an older version wrote it)", "recorded")
        structural = first_difference(saved, self.identity, STRUCTURE)
        if structural:
            raise IdentityMismatch(path, structural, saved.get(structural), self.identity.get(structural))
        changed = [k for k in self.identity if k in saved and saved[k] != self.identity[k]]
        if changed and not explicit:
            key = changed[0]
            raise IdentityMismatch(path, key, saved[key], self.identity[key])
        return checkpoint, changed

    def resume(self, checkpoint, path, probe_set, optimizer, scaler, *, main=True):
        """Heads, optimizer state (momentum) and best results from `checkpoint` (read from `path`); this run's lrs
        and weight decay stay in force (an optimizer's saved state would otherwise bring back the old ones). The
        main process (`main`) also takes the best heads and trims log.txt: it alone writes the files."""
        probe_set.load_state_dict(checkpoint["probes"])
        if "optimizer" not in checkpoint:
            raise ValueError("the checkpoint holds the best heads but no optimizer state")
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch = checkpoint["epoch"] + 1
        self.best = {name: checkpoint.get("best", {}).get(name, entry) for name, entry in self.best.items()}
        if not main:
            return
        # the best heads of the run resumed, next to its checkpoint: --resume OTHER/checkpoint-last.pth into a new
        # --output_dir keeps every probe's best weights, not only those that improve from here on
        best_path = Path(path).with_name(BEST)
        if best_path.exists():
            self.best_states = load_checkpoint(best_path).get("probes", {})
        truncate_log(self.output_dir / LOG, checkpoint["epoch"])

    # -- training

    def track(self, probe_set, test_stats, epoch):
        """Updates each probe's best acc1 and keeps a CPU copy of its weights; True if any probe improved."""
        improved = False
        for name in probe_set.names:
            acc1 = test_stats[name]["test_acc1"]
            if acc1 > self.best[name]["acc1"]:
                self.best[name] = {"acc1": acc1, "epoch": epoch}
                # keys as in ProbeSet.state_dict(), so either checkpoint loads into a ProbeSet
                self.best_states.update({probe_set.state_key(name) + k: v.detach().cpu().clone()
                                         for k, v in probe_set.probes[name].state_dict().items()})
                improved = True
        return improved

    def _payload(self, epoch, probes, config):
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "identity": self.identity,
                "config": config, "probes": probes, "epoch": epoch, "best": self.best}

    def save(self, epoch, probe_set, optimizer, scaler, improved, config):
        """checkpoint-best.pth (each probe at its best epoch) when one improved, then checkpoint-last.pth."""
        if improved:
            save_atomic(self._payload(epoch, self.best_states, config), self.output_dir / BEST)
        save_atomic({**self._payload(epoch, probe_set.state_dict(), config), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict()}, self.output_dir / LAST)


def read_heads_for_eval(path, identity):
    """The heads of a checkpoint for --eval: same structure and the same class names, or IdentityMismatch."""
    checkpoint = load_heads(path)
    saved = checkpoint.get("identity") or checkpoint.get("config") or {}
    key = first_difference(saved, identity, STRUCTURE)
    if key:
        raise IdentityMismatch(path, key, saved[key], identity[key])
    return checkpoint


# ---------------------------------------------------------------------------------------------------- files

def truncate_log(path, last_epoch):
    """Drop log.txt records of epochs after `last_epoch`: a kill between an epoch's log line and its checkpoint
    would otherwise leave an epoch the resumed run repeats. A line cut short (a kill or a full disk while it was
    appended) goes too."""
    path = Path(path)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if _epoch_of(line) <= last_epoch]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _epoch_of(line):
    try:
        return json.loads(line).get("epoch", -1)
    except ValueError:
        return math.inf


def write_run_info(output_dir, *, config, identity, classes, selection=None):
    """run.json (the resolved configuration, the experiment identity, and the training subset's size and
    images per class: what collect_results.py reads) and, when training on a subset, train_subset.txt."""
    subset = None
    if selection is None:  # an explicit --resume of a subset run on the whole split: no stale list stays behind
        (Path(output_dir) / SUBSET_LIST).unlink(missing_ok=True)
    else:
        write_text_atomic(Path(output_dir) / SUBSET_LIST, selection.listing)
        subset = {"label": selection.subset.label, "images": len(selection.indices), "sha256": selection.digest,
                  "per_class": {classes[label]: n for label, n in selection.per_class.items()}}
    write_json_atomic(Path(output_dir) / RUN_INFO, {"version": RUN_INFO_VERSION, "config": config,
                                                    "identity": identity, "train_subset": subset})


def write_results(output_dir, probes, best, extra_rows=()):
    """results.json and results.md: one row per probe with its best accuracy (probes not yet evaluated are left
    out), then the k-NN rows. Returns the Markdown table."""
    rows = [{"probe": p.name, "head": p.head, "lr": p.lr, "best_acc1": round(best[p.name]["acc1"], 3),
             "best_epoch": best[p.name]["epoch"]} for p in probes if best[p.name]["epoch"] >= 0]
    rows += list(extra_rows)
    write_json_atomic(Path(output_dir) / RESULTS, rows)
    lines = ["| probe | head | lr | best acc1 | epoch |", "|---|---|---|---|---|"]
    lines += [f"| {r['probe']} | {r['head']} | {'-' if r['lr'] is None else format(r['lr'], '.4g')} | "
              f"{r['best_acc1']:.2f} | {'-' if r['best_epoch'] is None else r['best_epoch']} |" for r in rows]
    table = "\n".join(lines)
    write_text_atomic(Path(output_dir) / "results.md", table + "\n")
    return table

