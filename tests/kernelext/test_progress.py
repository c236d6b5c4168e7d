"""The cell's progress display (kernelext/progress_bar.py): what it counts and draws from the
reports."""

import re

from jupyter_gpu.kernelext.progress_bar import Bar, ProgressDisplay, Series, sparkline


def reports(steps, every=1.0, total=None, **metrics):
    return [
        {
            "op": "metrics",
            "rank": 0,
            "step": s,
            "time": 1000.0 + i * every,
            "metrics": {**({"total": total} if total else {}), **metrics},
        }
        for i, s in enumerate(steps)
    ]


def test_steps_per_second_counts_steps_not_reports():
    bar = Bar(0, None)
    # every 10th step, one report a second: 10 steps/s
    for msg in reports(range(0, 100, 10), every=1.0):
        bar.add(msg)
    assert bar.rate == 10.0


def test_a_loop_counting_from_zero_ends_at_total_of_total_with_eta_before():
    bar = Bar(0, None)
    for msg in reports(range(45), total=45):
        bar.add(msg)
    assert (
        bar.done == 45
        and bar.fraction == 1.0
        and bar.text(finished=True).startswith("45/45 steps (100%)")
    )
    half = Bar(0, None)
    # counts from 1: 20 of 40 done, 2 steps/s
    for msg in reports(range(1, 21), every=0.5, total=40):
        half.add(msg)
    assert half.done == 20 and half.eta == 10.0 and "10 s left" in half.text()


def test_the_loss_curve_keeps_its_whole_shape_after_200_reports():
    """The sparkline drew the last 200 points over x = 0..199/(n-1) of its width: after 200 reports
    the curve shrank into the left of its box. It now draws a bounded, evenly thinned series over
    the width."""
    display = ProgressDisplay(widgets=False)
    display.min_interval = 1e9  # no rendering here
    for msg in reports(range(5000), loss=1.0):
        msg["metrics"]["loss"] = 1.0 / (msg["step"] + 1)
        display.add(msg)
    bar = display.ordered()[0]
    assert 200 <= len(bar.loss.values) <= 400 and bar.loss.values[0] == 1.0
    xs = [
        float(p.split(",")[0])
        for p in re.search(r"points='([^']*)'", sparkline(bar.loss.values)).group(1).split()
    ]
    assert xs[0] == 0.0 and xs[-1] == 160.0 and xs == sorted(xs)


def test_series_thins_evenly():
    s = Series(limit=8)
    for v in range(100):
        s.add(float(v))
    assert len(s.values) <= 8 and s.values[0] == 0.0
    gaps = {b - a for a, b in zip(s.values, s.values[1:])}
    assert len(gaps) == 1  # evenly spaced


def test_the_text_fallback_names_ranks_and_bars():
    display = ProgressDisplay(widgets=False)
    display.min_interval = 1e9
    for msg in reports(range(3), total=3):
        display.add(msg)
    display.add(
        {
            "op": "metrics",
            "rank": 1,
            "step": 5,
            "time": 1.0,
            "metrics": {"_bar": "epochs", "_done": True, "total": 10},
        }
    )
    text = display.bundle()["text/plain"].splitlines()
    assert text[0].startswith("rank 0: 3/3 steps (100%)") and text[1].startswith(
        "rank 1 · epochs: 5/10 steps (50%)"
    )


def test_a_zero_loss_reads_0_not_minus_0():
    """A loss of -0.0 (a log-likelihood at a perfect fit, ``-(x - x)``) read ``loss=-0``."""
    bar = Bar(0, None)
    for msg in reports(range(3), total=3, loss=-0.0):
        bar.add(msg)
    assert bar.text().endswith("loss=0") and "-0" not in bar.text(), bar.text()
    small = Bar(0, None)
    small.add(reports([0], total=3, loss=-2.5e-9)[0])
    assert small.text().endswith("loss=-2.5e-09")  # a small negative value is shown as it is


def test_rank_rows_are_in_rank_order_whichever_reports_first():
    """The widget rows followed the order in which ranks first reported: rank 1 above rank 0."""
    import ipywidgets

    from jupyter_gpu.kernelext.progress_bar import WidgetView

    view = WidgetView(ipywidgets)
    first, second = Bar(1, None), Bar(0, None)
    for bar in (first, second):
        for msg in reports(range(2), total=4):
            bar.add({**msg, "rank": bar.rank})
    view.update([first], finished=False)  # rank 1 reports first
    view.update([first, second], finished=False)
    labels = [row.children[0].value for row in view.box.children[:-1]]
    assert labels == ["rank 0", "rank 1"], labels
