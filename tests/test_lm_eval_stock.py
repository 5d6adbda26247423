"""Stock `lm_eval` with `sequnlearn tasks-path` as include path gives our backend's numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sequnlearn.cli import main
from sequnlearn.data.mcq import WMDP_ROBUST_CATEGORIES

FIXTURE = Path(__file__).parent / "fixtures" / "mcq_60.jsonl"


def _data_dir(tmp: Path) -> Path:
    """The fixture as an offline WMDP-Bio-Robust copy: ten questions per category."""
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    (tmp / "data").mkdir()
    (tmp / "data" / "wmdp_bio_robust.jsonl").write_text(
        "".join(json.dumps({**r, "category": WMDP_ROBUST_CATEGORIES[i % 6]}) + "\n" for i, r in enumerate(rows)))
    return tmp / "data"


@pytest.mark.slow
def test_stock_lm_eval_cli_reproduces_the_fast_backend(tmp_path, capsys):
    from sequnlearn.eval import evaluate
    from sequnlearn.model.load import load_model
    from sequnlearn.model.tiny import byte_tokenizer, tiny_model

    data = _data_dir(tmp_path)
    tiny_model("gpt_neox").save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    main(["tasks-path", "--data-dir", str(data), "--out", str(tmp_path / "tasks")])
    include = capsys.readouterr().out.strip()
    assert include == str(tmp_path / "tasks")
    groups = {"letter": "wmdp_bio_robust_sequnlearn"}  # the cloze group is built the same way; one keeps it short
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'model'},dtype=float32",
         "--device", "cpu", "--batch_size", "8", "--include_path", include, "--tasks", ",".join(groups.values()),
         "--output_path", str(tmp_path / "res")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = (tmp_path / "res").rglob("results_*.json")
    theirs = json.loads(result_file.read_text())["results"]
    model, tok = load_model(str(tmp_path / "model"), dtype="fp32", device="cpu")
    for style, group in groups.items():
        ours = evaluate(model, tok, "wmdp_bio_robust", data_dir=str(data), style=style, progress=False)
        task = ours["tasks"]["wmdp_bio_robust"]
        assert theirs[group]["acc,none"] == pytest.approx(task["acc"], abs=1e-9)
        for cat in WMDP_ROBUST_CATEGORIES:
            name = f"{group}_{cat}"
            assert theirs[name]["acc,none"] == pytest.approx(task["categories"][cat]["acc"], abs=1e-9), name
