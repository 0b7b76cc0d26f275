"""The training-curves notebook plots prosody when a run logged it, and says so when it did not."""

import csv

from test_notebooks import execute, outputs, stdout


def test_training_curves_plot_prosody_of_a_run_that_logged_it(monkeypatch, tmp_path):
    keys = ["step", "train/reward_mean", "train/prosody/f0_std_st_mean", "train/prosody/f0_std_st_group_std_mean",
            "train/prosody/reason_silent_mean"]
    run = tmp_path / "version_0"
    run.mkdir()
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for step in range(4):
            writer.writerow([step, 0.1 * step, 2.0 - 0.3 * step, 0.5 - 0.1 * step, 0.0])
    nb = execute("training_curves.ipynb", {"LG_RUN_DIR": str(tmp_path)}, monkeypatch)
    assert len(outputs(nb, "image/png")) == 3  # the default curves, the reasons, prosody
    assert "no train/prosody" not in stdout(nb)
