"""main_attention_stats.py end to end: files and names, crafted weights with known statistics, bad inputs."""
import csv
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main_attention_stats
from helpers import ROOT
from models_vit import build_encoder
from util.attention_metrics import metric_names
from util.data import build_image_set
from util.errors import UserError

EMBED, DEPTH, HEADS = 192, 12, 3  # vit_tiny_patch16
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 32 px at patch 16: a 2x2 grid, on which the Fourier metric is undefined (left out, with a note)
CLS_NAMES, PATCH_NAMES = metric_names(True, (2, 2)), metric_names(False, (2, 2))


@pytest.fixture(autouse=True)
def no_wandb(monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)  # a dashboard of the developer's must not start in tests


def save_mae_checkpoint(path, *, no_cls_token=False, uniform=False):
    """A random vit_tiny_patch16 in MAE's format (224px pos-embed, decoder keys the loader must drop).

    uniform: query and key projections are zero, so every score is 0 and attention is exactly uniform.
    """
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny_patch16", no_cls_token=no_cls_token, verbose=False)
    state = encoder.state_dict()
    if uniform:
        for i in range(DEPTH):
            state[f"blocks.{i}.attn.qkv.weight"][: 2 * EMBED] = 0
            state[f"blocks.{i}.attn.qkv.bias"][: 2 * EMBED] = 0
    state.update({"mask_token": torch.zeros(1, 1, EMBED), "decoder_embed.weight": torch.randn(16, EMBED)})
    torch.save({"model": state, "epoch": 3}, path)
    return path


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [[float(v) for v in row] for row in rows[1:]]


def run_main(*argv):
    args = main_attention_stats.get_args_parser().parse_args([*argv, "--num_workers", "0", "--device", "cpu"])
    main_attention_stats.main(args)


def mean_pairwise_distance(grid, patch_size):
    cells = list(itertools.product(range(grid[0]), range(grid[1])))
    return patch_size * sum(math.dist(a, b) for a, b in itertools.product(cells, cells)) / len(cells) ** 2


def test_cli_writes_every_file_and_keeps_other_files(tmp_path):
    ckpt = save_mae_checkpoint(tmp_path / "mae.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = subprocess.run(
        [sys.executable, "main_attention_stats.py", "--model", "vit_tiny_patch16", "--finetune", str(ckpt),
         "--data_path", "samples", "--input_size", "32", "--batch_size", "3", "--max_images", "8",
         "--num_workers", "0", "--device", "cpu", "--output_dir", str(out), "--draw_2d_embeddings", "--tensorboard"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr
    assert "img/s" in proc.stderr  # the tqdm bar
    header, rows = read_csv(out / "attention_stats.csv")
    assert header == ["block", *CLS_NAMES]
    assert [row[0] for row in rows] == list(range(DEPTH))
    assert all(math.isfinite(v) for row in rows for v in row)
    report = json.loads((out / "attention_stats.json").read_text())
    meta = report["metadata"]
    assert (meta["model"], meta["checkpoint"], meta["images"], meta["input_size"]) == (
        "vit_tiny_patch16", str(ckpt), 8, 32)
    assert report["metrics"] == list(CLS_NAMES) and len(report["blocks"]) == DEPTH
    first = report["blocks"][0]
    assert first["cls_cls_attention"] == pytest.approx(rows[0][1], rel=1e-6)
    assert len(first["nmi_per_head"]) == HEADS
    assert first["nmi"] == pytest.approx(np.mean(first["nmi_per_head"]), rel=1e-6)
    pngs = [f"plot_{m}.png" for m in CLS_NAMES] + ["cls_attention_overlays.png", "tsne_images.png",
                                                     "tsne_tokens.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()  # every figure and the table in TensorBoard too, not only in wandb
    assert sorted(events.Tags()["images"]) == sorted(f"attention_stats/{Path(name).stem}" for name in pngs)
    table = events.Tensors("attention_stats/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| block | " + " | ".join(CLS_NAMES) + " |"
    assert len(table.splitlines()) == 2 + DEPTH
    assert [e.step for e in events.Scalars("attention_stats/nmi")] == list(range(DEPTH))
    assert (out / "notes.txt").read_text() == "mine"


def test_uniform_attention_weights_give_hand_computed_statistics(tmp_path):
    ckpt = save_mae_checkpoint(tmp_path / "uniform.pth", uniform=True)
    size, grid, patch = 64, (4, 4), 16
    N, T = 16, 17
    run_main("--model", "vit_tiny_patch16", "--finetune", str(ckpt), "--input_size", str(size),
             "--batch_size", "4", "--max_images", "7", "--output_dir", str(tmp_path / "out"))
    header, rows = read_csv(tmp_path / "out" / "attention_stats.csv")
    values = [dict(zip(header, row)) for row in rows]

    # magnitudes and spectra depend on the images: recompute them with timm's own block modules and numpy's FFT
    encoder = build_encoder("vit_tiny_patch16", str(ckpt), input_size=size, verbose=False)
    images = torch.stack([image for image, _ in build_image_set("samples", size, max_images=7)])
    highest = (grid[0] - 1) // 2  # last point of cl-vs-mim's half diagonal on a 4x4 grid
    with torch.no_grad():
        x = encoder.norm_pre(encoder._pos_embed(encoder.patch_embed(images)))
        for block, blk in enumerate(encoder.blocks):
            ratio = blk.ls1(blk.attn(blk.norm1(x))).norm(dim=-1) / x.norm(dim=-1)
            x = blk(x)
            spectrum = np.fft.fft2(x[:, 1:].double().numpy().reshape(len(images), *grid, EMBED), axes=(1, 2))
            log_amplitude = np.log(np.abs(spectrum) + 1e-6).mean(-1)
            expected = {
                "block": block,
                "cls_cls_attention": 1 / T, "pos_self_attention": 1 / T,
                "cls_cls_attention_adj_for_cls": 1 / N, "pos_self_attention_adj_for_cls": 1 / N,
                "cls_pos_attention": 1 / T, "pos_cls_attention": 1 / T,
                "cls_pos_entropy": math.log(N), "pos_pos_entropy": math.log(N),
                "cls_magnitude": ratio[:, 0].mean().item(), "pos_magnitude": ratio[:, 1:].mean().item(),
                "attention_distance": mean_pairwise_distance(grid, patch), "nmi": 0.0,
                "fourier_delta_log_amplitude": (log_amplitude[:, highest, highest] - log_amplitude[:, 0, 0]).mean(),
            }
            assert set(values[block]) == set(expected)
            for name, value in expected.items():
                assert values[block][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (block, name)


def test_encoder_without_cls_reports_patch_metrics_only(tmp_path):
    ckpt = save_mae_checkpoint(tmp_path / "nocls.pth", no_cls_token=True)
    out = tmp_path / "out"
    run_main("--model", "vit_tiny_patch16", "--finetune", str(ckpt), "--no_cls_token", "--input_size", "32",
             "--max_images", "4", "--output_dir", str(out))
    header, rows = read_csv(out / "attention_stats.csv")
    assert header == ["block", *PATCH_NAMES] and len(rows) == DEPTH
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"plot_{m}.png" for m in PATCH_NAMES)


def test_compare_overlays_runs(tmp_path):
    for name, offset in (("mae", 0.0), ("dino", 1.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "attention_stats.csv").write_text(
            "block,cls_cls_attention,nmi\n" + "".join(f"{b},{offset + b / 10},{b / 20}\n" for b in range(3)))
    (tmp_path / "nocls").mkdir()
    (tmp_path / "nocls" / "attention_stats.csv").write_text("block,nmi\n0,0.1\n1,0.2\n")
    run_main("--compare", str(tmp_path / "mae"), str(tmp_path / "dino"), str(tmp_path / "nocls"),
             "--output_dir", str(tmp_path / "cmp"))
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["attention_stats_outputs.json",
                                                                     "compare_cls_cls_attention.png",
                                                                     "compare_nmi.png"]


@pytest.mark.parametrize("argv, message", [
    (["--data_path", "/nonexistent/images"], "does not exist"),
    (["--finetune", "/nonexistent/ckpt.pth"], "checkpoint /nonexistent/ckpt.pth does not exist"),
    (["--finetune", "NOTACKPT"], "is not a torch or safetensors checkpoint"),
    (["--finetune", "FOLDER"], "is a folder"),
    (["--input_size", "40"], "--input_size 40 is not divisible by the patch size 16"),
    (["--input_size", "0"], "--input_size 0 must be positive"),
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--compare", "EMPTYRUN"], "holds no statistics"),
    (["--compare", "BADRUN"], "not a number"),
    (["--batch_size", "0"], "--batch_size 0 must be at least 1"),
    (["--max_images", "0"], "--max_images 0 must be at least 1"),
    (["--checkpoint_key", "teacher", "--finetune", "CKPT"], "has no 'teacher' entry"),
    (["--compare", "/nonexistent/run"], "attention_stats.csv does not exist"),
    (["--data_path", "FLAT"], "cannot read image .*broken.jpg"),
])
def test_bad_inputs_are_one_line_user_errors_and_touch_nothing(tmp_path, argv, message):
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("hello")
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1, 5, 8)}}, ckpt)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (40, 40), 128).save(flat / "gray.png")
    (flat / "broken.jpg").write_bytes(b"not a jpeg")
    runs = {}
    for name, text in (("EMPTYRUN", ""), ("BADRUN", "block,nmi\n0,zero\n")):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / "attention_stats.csv").write_text(text)
    names = {"NOTACKPT": str(not_a_checkpoint), "CKPT": str(ckpt), "FLAT": str(flat), "FOLDER": str(tmp_path),
             **{k: str(v) for k, v in runs.items()}}
    argv = [names.get(a, a) for a in argv]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as err:
        run_main("--model", "vit_tiny_patch16", "--input_size", "32", "--output_dir", str(out), *argv)
    assert "\n" not in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        run_main("--model", "vit_tiny_patch16", "--input_size", "32", "--output_dir", str(tmp_path / "file"))


@pytest.mark.parametrize("compare", [False, True])
def test_a_folder_another_run_holds_is_refused_and_untouched(tmp_path, compare):
    from util.run_state import OutputLock
    run_main("--model", "vit_tiny_patch16", "--input_size", "32", "--max_images", "2",
             "--output_dir", str(tmp_path / "run"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "attention_stats.csv").write_text("block,nmi\n0,0.5\n")  # the holder's result so far
    argv = ["--compare", str(tmp_path / "run")] if compare else ["--model", "vit_tiny_patch16", "--input_size", "32"]
    lock = OutputLock(out).acquire()
    try:
        with pytest.raises(UserError, match=r"in use by another run \(PID \d+\) \(wait for it to finish"):
            run_main(*argv, "--output_dir", str(out))
    finally:
        lock.release()
    assert [p.name for p in out.iterdir()] == ["attention_stats.csv"]
    assert (out / "attention_stats.csv").read_text() == "block,nmi\n0,0.5\n"


def test_cli_error_is_one_line_on_stderr_with_exit_code_2(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    proc = subprocess.run([sys.executable, "main_attention_stats.py", "--model", "vit_tiny_patch16",
                           "--finetune", str(tmp_path / "missing.pth"), "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_reused_folder_holds_only_the_new_runs_outputs(tmp_path):
    out = tmp_path / "out"
    run_main("--model", "vit_tiny_patch16", "--input_size", "32", "--max_images", "4", "--draw_2d_embeddings",
             "--output_dir", str(out))  # an earlier run, of an encoder with [cls]
    assert (out / "plot_cls_cls_attention.png").is_file() and (out / "tsne_images.png").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "plot_my_paper_figure.png").write_bytes(PNG_MAGIC)  # a user's figure, named like our plots
    (out / "tsne_tokens.png").write_bytes(PNG_MAGIC + b"edited by hand")  # ours once, changed since
    encoder_without_cls = tmp_path / "ijepa.pth"
    save_mae_checkpoint(encoder_without_cls, no_cls_token=True)
    run_main("--model", "vit_tiny_patch16", "--input_size", "32", "--no_cls_token", "--finetune",
             str(encoder_without_cls), "--output_dir", str(out))
    pngs = sorted(p.name for p in out.glob("*.png"))
    # the stale [cls] plots and t-SNE are gone; the user's files stay
    assert pngs == sorted([*(f"plot_{m}.png" for m in PATCH_NAMES), "plot_my_paper_figure.png", "tsne_tokens.png"])
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "tsne_tokens.png").read_bytes() == PNG_MAGIC + b"edited by hand"
    recorded = json.loads((out / "attention_stats_outputs.json").read_text())
    assert sorted(recorded["measure"]) == sorted(["attention_stats.csv", "attention_stats.json",
                                                  *(f"plot_{m}.png" for m in PATCH_NAMES)])


def test_compare_removes_only_the_comparison_plots_it_wrote(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "attention_stats.csv").write_text("block,cls_cls_attention,nmi\n0,0.5,0.1\n1,0.4,0.2\n")
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare_baselines_final.png").write_bytes(PNG_MAGIC)  # a user's figure, named like ours
    run_main("--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output_dir", str(out))
    (tmp_path / "a" / "attention_stats.csv").write_text("block,nmi\n0,0.1\n1,0.2\n")
    (tmp_path / "b" / "attention_stats.csv").write_text("block,nmi\n0,0.3\n1,0.2\n")
    run_main("--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output_dir", str(out))
    assert sorted(p.name for p in out.glob("*.png")) == ["compare_baselines_final.png", "compare_nmi.png"]


@pytest.mark.parametrize("name,has_cls", [("vit_small_patch14_reg4_dinov2", True),
                                          ("vit_medium_patch16_reg4_gap_256", False)])
def test_register_encoders_keep_registers_out_of_cls_and_patches(name, has_cls):
    """Token 0 is [cls] when there is one; registers are neither [cls] nor patches in any output."""
    patch = 14 if "dinov2" in name else 8
    size, prefix = 4 * patch, int(has_cls) + 4
    torch.manual_seed(0)
    encoder = build_encoder(name, input_size=size, patch_size=patch, embed_dim=32, depth=2, num_heads=2,
                            verbose=False)
    images = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(5)), batch_size=5)
    embeddings = main_attention_stats.EmbeddingSamples(0)
    stats, _, maps = main_attention_stats.measure(encoder, loader, "cpu", "none", embeddings)
    assert {k for k in stats.result()[1] if not k.endswith("_per_head")} == set(metric_names(has_cls, (4, 4)))
    with torch.no_grad():
        tokens = encoder.forward_tokens(images)
        last = encoder.blocks[-1]
        x = last.norm1(encoder.forward_tokens(images, block=0))
        q, k, _ = last.attn.qkv(x).reshape(5, 20 + int(has_cls), 3, 2, 16).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * 16 ** -0.5).softmax(-1)
    features = torch.cat(embeddings.images)
    if has_cls:
        assert torch.allclose(features, tokens[:, 0], atol=1e-6)
        assert torch.allclose(maps, attn[:, :, 0, prefix:].mean(1).reshape(5, 4, 4), atol=1e-6)
    else:
        assert maps is None and torch.allclose(features, tokens[:, prefix:].mean(1), atol=1e-6)
