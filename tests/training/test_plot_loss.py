"""training.plot_loss: loss curves of runs in one figure."""

from PIL import Image

from training.plot_loss import main, read_loss, running_mean


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step,loss,lr,images_per_s\n" + "".join(f"{s},{v},1e-3,10\n" for s, v in rows))
    return path


def test_running_mean_and_reading():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0], 5) == [2.0]


def test_plots_runs_and_refuses_bad_input(tmp_path, capsys):
    a = _write(tmp_path / "a" / "loss.csv", [(50, 0.5), (100, 0.2), (150, 0.1)])
    b = _write(tmp_path / "b" / "loss.csv", [(50, 0.4), (100, 0.3)])
    assert read_loss(a) == ([50, 100, 150], [0.5, 0.2, 0.1])
    out = tmp_path / "plot" / "loss.png"
    assert main([str(a), str(b), "--out", str(out), "--smooth", "2"]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 300
    empty = _write(tmp_path / "c" / "loss.csv", [])
    assert main([str(empty), "--out", str(out)]) == 2
    assert "no step,loss rows" in capsys.readouterr().err
    assert main([str(a), "--labels", "x", "y", "--out", str(out)]) == 2
