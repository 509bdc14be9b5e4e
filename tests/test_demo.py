"""`fastdiff demo` (what `make demo` runs): its plan, checked without running it, against a measured time budget."""

from __future__ import annotations

from fastdiff.commands.demo import DEMO_N, demo_plan, unet_rows_per_image

# Measured (eval/results/demo/README.md): the default demo made DEMO_ROWS UNet rows in DEMO_S seconds on 2 quiet
# cores. The budget is the rows that fit in 3 minutes at that rate.
DEMO_ROWS, DEMO_S = 20_250, 91.5
BUDGET_ROWS = DEMO_ROWS * 180 / DEMO_S


def test_default_plan_fits_three_minutes_cheapest_row_first():
    plan = demo_plan()
    rows = [unet_rows_per_image(m) for m in plan.methods]
    assert plan.n == DEMO_N and len(rows) >= 10
    assert rows == sorted(rows) and rows[0] <= 5  # the first row is seconds away
    assert plan.n * sum(rows) <= BUDGET_ROWS, (plan.n * sum(rows), BUDGET_ROWS)


def test_unet_rows_count_the_cfg_batch():
    from fastdiff.eval.methods import MethodSpec

    assert unet_rows_per_image(MethodSpec(name="a", steps=10, guidance=1.0)) == 10
    assert unet_rows_per_image(MethodSpec(name="b", steps=10, guidance=2.0)) == 20
    ddpm = MethodSpec(name="c", scheduler="DDPMScheduler", timesteps=[999, 500, 1])
    assert unet_rows_per_image(ddpm) == 6  # guidance unset: the pipeline's default 3, two rows per step
