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
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

from util.checkpoint import load_checkpoint, save_atomic, write_json_atomic, write_text_atomic

CHECKPOINT_FORMAT = "beyond-cls linear probing"
CHECKPOINT_VERSION = 2
LAST, BEST, LOCK, LOG = "checkpoint-last.pth", "checkpoint-best.pth", ".lock", "log.txt"
TENSORBOARD = "tensorboard"  # util.run_log.RunLog's folder of events
RANDOM_INIT = "random init"
RUN_INFO, SUBSET_LIST, RESULTS = "run.json", "train_subset.txt", "results.json"
RUN_INFO_VERSION = 1


class OutputDirBusy(RuntimeError):
    """Another process holds the output folder's lock."""


class IdentityMismatch(ValueError):
    """A checkpoint of another experiment: `setting` is the first that differs."""

    def __init__(self, path, setting, saved, current):
        self.path, self.setting, self.saved, self.current = path, setting, saved, current
        super().__init__(f"{path} was saved with {setting}={describe_source(saved)!r}, this run has "
                         f"{setting}={describe_source(current)!r}")


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
    """What identifies an encoder source, as data: a file is {"name", "bytes", "sha256"} (the first 16 hex digits
    of its SHA-256; a copy or a move stays the same experiment, an overwritten file does not); a timm name is
    itself, no source is "random init"."""
    if not source:
        return RANDOM_INIT
    path = Path(source).expanduser()
    if not path.is_file():
        return str(source)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


# run.json files and checkpoints written before fingerprints were data hold them as this prose
LEGACY_FINGERPRINT = re.compile(r"^(?P<name>.+) \((?P<bytes>\d+) bytes, sha256 (?P<sha256>[0-9a-f]+)\)$")


def as_fingerprint(recorded):
    """A recorded encoder source in today's form: the legacy prose "name (N bytes, sha256 X)" becomes its dict."""
    match = LEGACY_FINGERPRINT.match(recorded) if isinstance(recorded, str) else None
    if match:
        return {"name": match["name"], "bytes": int(match["bytes"]), "sha256": match["sha256"]}
    return recorded


def describe_source(value):
    """A fingerprint as one readable string ("name (N bytes, sha256 X)"); any other value unchanged."""
    if isinstance(value, dict) and "name" in value and "bytes" in value:
        digest = f", sha256 {value['sha256']}" if value.get("sha256") else ""
        return f"{value['name']} ({value['bytes']} bytes{digest})"
    return value


def same_source(recorded, source):
    """(whether `source` (a path, a timm name or "") is the encoder `recorded` as a fingerprint, what it is as far as
    that took to know). A file's size is compared first: its content is hashed only when the sizes agree (an
    overwritten checkpoint often keeps its size). A renamed copy is the same encoder here."""
    recorded = as_fingerprint(recorded)
    path = Path(source).expanduser() if source else None
    if path is None or not path.is_file():
        current = fingerprint(source)
        return recorded == current, current
    current = {"name": path.name, "bytes": path.stat().st_size}
    if not isinstance(recorded, dict) or recorded.get("bytes") != current["bytes"]:
        return False, current
    current["sha256"] = file_sha256(path)
    return recorded.get("sha256") == current["sha256"], current


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


def pretrain_identity(config):
    """The settings that define a pretraining experiment (config.PretrainConfig): what main_pretrain.py
    records as its checkpoints' and release files' "config" and a resume must match. Output, logging, device and
    worker settings are not in it. Sorted by name, as those files have always held it (part of their bytes)."""
    c = config
    return {"batch_size": c.batch_size, "blr": c.blr, "crop_min": c.crop_min, "data_path": c.data_path,
            "decoder_depth": c.decoder_depth, "decoder_dim": c.decoder_dim, "decoder_heads": c.decoder_heads,
            "depth": c.depth, "embed_dim": c.embed_dim, "epochs": c.epochs, "input_size": c.input_size, "lr": c.lr,
            "mask_ratio": c.mask_ratio, "max_images": c.max_images, "method": c.method, "min_lr": c.min_lr,
            "moco_dim": c.moco_dim, "moco_m": c.moco_m, "moco_mlp_dim": c.moco_mlp_dim, "moco_t": c.moco_t,
            "model": c.model, "norm_pix_loss": c.norm_pix_loss, "num_heads": c.num_heads, "seed": c.seed,
            "warmup_epochs": c.warmup_epochs, "weight_decay": c.weight_decay}


# What the heads were trained on and for: no resume, explicit or not, may change it.
STRUCTURE = ("probes", "nb_classes", "classes", "model", "head_options", "return_block", "final_norm")


def first_difference(saved, current, keys):
    """The first of `keys` that `saved` records with another value than `current` (keys it lacks are unknown)."""
    return next((key for key in keys if key in saved and not _same(key, saved[key], current.get(key))), None)


def _same(key, saved, current):
    if key == "head_options" and isinstance(saved, dict) and isinstance(current, dict):
        # options added since the checkpoint was written (ep_d_out, esimpool_heads, ...) did not exist then: the
        # heads it holds were built as those options' defaults build them
        return all(current.get(name) == value for name, value in saved.items())
    return saved == current


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
        self.resumed_from = None  # the checkpoint resumed, if any

    # -- resume

    def resume_path(self, resume=""):
        """The checkpoint to continue from: `resume` (--resume) if given, else the output folder's
        checkpoint-last.pth if there is one, else ""."""
        path = self.output_dir / LAST
        return resume or (str(path) if path.exists() else "")

    def read(self, path, *, explicit):
        """The checkpoint at `path` if it may continue this experiment. Auto-resume (explicit False) needs the same
        identity; an explicit one the same head structure. Returns (checkpoint, changed settings)."""
        checkpoint = load_heads(path)
        saved = recorded_identity(checkpoint)
        if "identity" not in checkpoint:  # written before identities were recorded (version 1)
            if not explicit:
                raise IdentityMismatch(path, "identity", "not recorded (an older version wrote it)", "recorded")
        structural = first_difference(saved, self.identity, STRUCTURE)
        if structural:
            raise IdentityMismatch(path, structural, saved.get(structural), self.identity.get(structural))
        changed = [k for k in self.identity if k in saved and not _same(k, saved[k], self.identity[k])]
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
        self.resumed_from = str(path)
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


def recorded_identity(checkpoint):
    """The identity a checkpoint records, fingerprints in today's form; of a version 1 checkpoint (no identity)
    only what defines the heads' structure is known."""
    saved = checkpoint.get("identity")
    if saved is None:
        legacy = checkpoint.get("config", {})
        return {key: legacy.get(key) for key in
                ("probes", "nb_classes", "model", "head_options", "return_block", "final_norm")}
    return {key: as_fingerprint(value) if key in ("encoder", "oracle") else value for key, value in saved.items()}


# What --eval compares besides the encoders: the heads' structure, the class names, and which tokens the heads read.
EVAL_SETTINGS = STRUCTURE + ("checkpoint_key", "input_size")


def read_heads_for_eval(path, identity):
    """The heads of a checkpoint for --eval, or IdentityMismatch naming the first setting that differs: the heads'
    structure and class names, the tokens they read (sub-model, input size, block, final norm), the encoder and
    oracle (by size, then content: `identity` holds them as given, paths or names, not yet hashed), and for a
    random-initialised encoder the seed that drew it."""
    checkpoint = load_heads(path)
    saved = recorded_identity(checkpoint)
    key = first_difference(saved, identity, EVAL_SETTINGS)
    if key:
        raise IdentityMismatch(path, key, saved[key], identity[key])
    for key in ("encoder", "oracle"):
        if key in saved and (saved[key], identity.get(key)) != (None, None):  # None: no oracle
            same, current = same_source(saved[key], identity.get(key))
            if not same:
                raise IdentityMismatch(path, key, saved[key], current)
    if saved.get("encoder") == RANDOM_INIT and first_difference(saved, identity, ["seed"]):
        raise IdentityMismatch(path, "seed", saved["seed"], identity["seed"])
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


def set_aside_old_log(output_dir):
    """A run starting afresh (no checkpoint resumed) in a folder holding another run's log.txt (its checkpoints
    deleted) would append to it: that log.txt, and the TensorBoard events beside it, are renamed to log.N.txt and
    tensorboard.N/ (the first N free), never deleted. Returns the log's new path, or None when there was none."""
    folder = Path(output_dir)
    log = folder / LOG
    if not log.is_file() or log.stat().st_size == 0:
        return None
    n = 1
    while (folder / f"log.{n}.txt").exists() or (folder / f"{TENSORBOARD}.{n}").exists():
        n += 1
    os.rename(log, folder / f"log.{n}.txt")
    if (folder / TENSORBOARD).is_dir():
        os.rename(folder / TENSORBOARD, folder / f"{TENSORBOARD}.{n}")
    return folder / f"log.{n}.txt"


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

