"""What the entry points share at the command line: the encoder and runtime flags, and how a run ends.

A user's mistake ends in one line `error: <problem> (<what to do>)` on stderr and exit code 2, without a
traceback. Under a launcher (torchrun) the line is printed once: by rank 0, or by the rank whose own share of the
work failed (prefixed with its rank), and it is also written to torchrun's error file, so torchrun's own failure
summary names it as the root cause. A process whose collective fails because another process went away prints
nothing (that process said why) and exits 2. Ctrl-C ends in one line and exit code 130.
"""
import json
import os
import sys
import time
from contextlib import contextmanager

import torch

from util.checkpoint import UnsafeCheckpoint
from util.dist import RendezvousError, launch_env, peer_failed
from util.errors import UserError, user_errors
from util.images import find_bad_image
from util.release_layouts import (
    MissingKeys,
    NoFinalNorm,
    NonFiniteWeights,
    NoPretrainedWeights,
    NotAStateDict,
    TruncatedCheckpoint,
)
from util.run_state import OutputDirBusy, lock_output_dir

INTERRUPTED_EXIT = 130
# What a user should do when reading the --finetune encoder or writing a result fails (first matching type wins).
# Both ways past a checkpoint that asks to run code; each is the user's explicit choice (README, Security).
TRUST_REMEDY = ("only if you trust its author: pass --trust_checkpoint, which runs that code, or convert the file "
                "once with python -m util.checkpoint FILE FILE.safetensors")
ENCODER_REMEDIES = {UnsafeCheckpoint: TRUST_REMEDY,
                    FileNotFoundError: "check the --finetune path", IsADirectoryError: "pass a checkpoint file",
                    NonFiniteWeights: "use a checkpoint saved before the run diverged",
                    NoFinalNorm: "drop --final_norm: these tokens have no final norm to apply",
                    NoPretrainedWeights: "pick a name that timm.list_pretrained() lists, or a checkpoint file, "
                                         "as --finetune",
                    NotAStateDict: "pass the file that holds the weights, e.g. one written by "
                                   "torch.save(model.state_dict(), path)",
                    TruncatedCheckpoint: "copy or download the file again: it stops before its end",
                    MissingKeys: "pass the timm name of the checkpoint's architecture as --model, or a complete "
                                 "checkpoint",
                    ValueError: "pick the --model that matches the checkpoint, or set --checkpoint_key",
                    OSError: "check the --finetune path"}
SAVE_REMEDIES = {OSError: "free some disk space, or pass another --output_dir"}
OUTPUT_DIR_REMEDIES = {OutputDirBusy: "wait for it to finish, or pass another --output_dir",
                       OSError: "pass a writable --output_dir"}


def take_output_dir(output_dir):
    """Create --output_dir and hold its lock (release it when the run ends), or a UserError."""
    with user_errors(OUTPUT_DIR_REMEDIES):
        return lock_output_dir(output_dir)


@contextmanager
def bad_images_reported(remedy, *, rank_local=False):
    """An unreadable image met while iterating data (a DataLoader worker re-raises it as a RuntimeError with its
    traceback) becomes one line naming the file; `rank_local`: the rank whose shard holds it prints it."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        bad = find_bad_image(err)
        if bad is None:
            raise
        error = UserError(f"{bad} ({remedy})")
        error.rank_local = rank_local
        raise error from None


def add_model_arguments(parser, *, default_model, default_input_size, timm_names=True):
    """--model and --input_size; `timm_names`: --model also takes a timm ViT-family architecture name."""
    from models_vit import MODELS

    more = (" or a timm ViT-family architecture name, e.g. vit_small_patch14_reg4_dinov2 or beitv2_base_patch16_224"
            if timm_names else "")
    parser.add_argument("--model", default=default_model, help="a preset (" + ", ".join(MODELS) + ")" + more)
    parser.add_argument("--input_size", type=int, default=default_input_size,
                        help="image side in pixels (a multiple of the patch)")


def add_encoder_arguments(parser, *, default_model="vit_base_patch16"):
    """--model, --input_size, --finetune, --checkpoint_key, --simmim, --trust_checkpoint, --no_cls_token."""
    add_model_arguments(parser, default_model=default_model, default_input_size=224)
    parser.add_argument("--finetune", default="", help="checkpoint file of any supported release (its layout is "
                        "recognised from the file; see README), or a timm pretrained name (default: random init)")
    parser.add_argument("--checkpoint_key", default="", help="sub-model or entry to read (default: the one the "
                        "release evaluates, e.g. teacher, target_encoder, base_encoder)")
    parser.add_argument("--simmim", action="store_true", help="optional: insist that --finetune is a SimMIM/BEiT file")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="unpickle the checkpoint fully: RUNS ANY CODE THE FILE HOLDS. Only for a file whose "
                             "author you trust; without it a file that asks for more than tensors and plain data is "
                             "refused")
    parser.add_argument("--no_cls_token", action="store_true", help="random encoder without [cls]; a checkpoint "
                        "without one is recognised without this flag")


def add_runtime_arguments(parser, *, amp_default, num_workers_default=8):
    """--device, --amp (amp_default None: no --amp, the run is float32), --seed, --num_workers."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    if amp_default is not None:
        parser.add_argument("--amp", choices=["bfloat16", "float16", "none"], default=amp_default,
                            help="autocast dtype of the frozen forward and the heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=num_workers_default, help="data loading processes")


def add_logging_arguments(parser, *, images=False):
    """--wandb, --run_name, --wandb_project/_entity/_group/_tags; `images`: --log_images_every."""
    parser.add_argument("--wandb", action="store_true", help="log to wandb (also on when WANDB_PROJECT is set)")
    parser.add_argument("--run_name", default=None, help="wandb run name (default: the output folder's name)")
    parser.add_argument("--wandb_project", default=None, help="wandb project (default: $WANDB_PROJECT or beyond-cls)")
    parser.add_argument("--wandb_entity", default=None, help="wandb team or user (default: wandb's own default)")
    parser.add_argument("--wandb_group", default=None, help="wandb group (default: the output folder's name)")
    parser.add_argument("--wandb_tags", default="", help="comma-separated wandb tags")
    if images:
        parser.add_argument("--log_images_every", type=int, default=10, metavar="N",
                            help="pictures to the dashboards every N epochs and after the last (0: none)")


def _report(line, rank_local):
    rank, world, _ = launch_env()
    if world > 1 and rank_local:
        line = line.replace("error: ", f"error: rank {rank}: ", 1)
    if world <= 1 or rank == 0 or rank_local:  # else every rank hit the same error: rank 0 says it
        print(line, file=sys.stderr, flush=True)
    _error_file(line)


def _error_file(line, *, later=0):
    """torchrun prints the message of the earliest error file as its failure summary's root cause; `later`
    dates it that many seconds on (a process stopped by another's failure is never the root cause)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time()) + later}, f)
        except OSError:
            pass


def run(main, parser):
    """Parse the command line and call main(args), turning user errors and Ctrl-C into one line."""
    args = parser.parse_args()
    try:
        main(args)
    except UserError as err:
        _report(f"error: {err}", getattr(err, "rank_local", False))
        sys.exit(2)
    except RendezvousError as err:
        _report(f"error: {err} (unset RANK and WORLD_SIZE to run one process, or start every process, e.g. with "
                "torchrun)", False)
        sys.exit(2)
    except KeyboardInterrupt as err:  # main may re-raise it with a note on what was saved
        _report(f"interrupted{': ' + str(err) if str(err) else ''}", False)
        sys.exit(INTERRUPTED_EXIT)
    except Exception as err:
        if not peer_failed(err):
            raise
        _error_file(f"rank {launch_env()[0]} stopped: another process failed", later=1)
        sys.exit(2)
