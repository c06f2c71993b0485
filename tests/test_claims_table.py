"""benchmarks/claims_table.py: the README's claims table from a claims_in_miniature.sh output folder."""
import json
import sys
from pathlib import Path

from helpers import ROOT

sys.path.insert(0, str(Path(ROOT) / "benchmarks"))
import claims_table  # noqa: E402


def test_the_table_holds_each_heads_best_over_the_sweep_and_the_knn_rows(tmp_path, capsys):
    rows = [{"probe": "cls_blr5", "head": "cls", "lr": 2.5, "best_acc1": 24.7, "best_epoch": 21},
            {"probe": "cls_blr20", "head": "cls", "lr": 10.0, "best_acc1": 28.2, "best_epoch": 27},
            {"probe": "pos_blr5", "head": "pos", "lr": 2.5, "best_acc1": 29.7, "best_epoch": 24},
            {"probe": "abmilp_blr5", "head": "abmilp", "lr": 2.5, "best_acc1": 41.8, "best_epoch": 25},
            {"probe": "knn_cls_k10_T0.07", "head": "knn-cls", "lr": None, "best_acc1": 12.4, "best_epoch": None},
            {"probe": "knn_mean_k10_T0.07", "head": "knn-mean", "lr": None, "best_acc1": 17.5, "best_epoch": None},
            {"probe": "knn_mean_k20_T0.07", "head": "knn-mean", "lr": None, "best_acc1": 19.0, "best_epoch": None}]
    folder = tmp_path / "linprobe" / "mae"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(rows))
    claims_table.main(tmp_path)
    table = capsys.readouterr().out.splitlines()
    assert "| mae | 28.2 (lr 10, ep 27) | 29.7 (lr 2.5, ep 24) | 41.8 (lr 2.5, ep 25) | 12.4 | 17.5 |" in table
