"""Tests of fastdiff.search (AutoDiffusion): the evolutionary operators, the objectives, search_timesteps, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from fastdiff.eval.metrics import compute_stats
from fastdiff.search import SearchConfig, SearchResult, search_timesteps
from fastdiff.search.evolutionary import (
    Candidate,
    SearchSpace,
    crossover,
    make_candidate,
    mutate,
    next_generation,
    random_candidate,
    select_parents,
)
from fastdiff.search.objectives import (
    ExactObjective,
    PipelineObjective,
    betas_from_alphas_cumprod,
)
from fastdiff.testing import GaussianMixtureDenoiser


@pytest.fixture(scope="module")
def mixture() -> GaussianMixtureDenoiser:
    """Three well-separated narrow components in 1x4x4: few-step solvers are visibly wrong on it."""
    gen = torch.Generator().manual_seed(0)
    means = torch.rand((3, 1, 4, 4), generator=gen, dtype=torch.float64) * 2 - 1
    return GaussianMixtureDenoiser(means=means, stds=torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64))


def _diffusers_dpmpp(model, **flags) -> DPMSolverMultistepScheduler:
    """diffusers' own DPM-Solver++ 2M on the mixture's schedule: the reference sampler for the baselines."""
    return DPMSolverMultistepScheduler(num_train_timesteps=len(model.alphas_cumprod),
                                       trained_betas=betas_from_alphas_cumprod(model.alphas_cumprod),
                                       algorithm_type="dpmsolver++", solver_order=2, **flags)


# ------------------------------------------------------------------------------------------------ operators
def test_operators_keep_candidates_valid_sorted_and_distinct():
    space = SearchSpace(num_steps=5, max_timestep=99, num_key_steps=2, fix_first=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        a, b = random_candidate(space, gen), random_candidate(space, gen)
        m = mutate(a, space, 0.25, gen)
        assert space.contains(a) and space.contains(m) and m != a
        assert m.timesteps[0] == 99 and m.key_steps[0] == 0
        child = crossover(a, b, gen)
        if child is not None:
            assert space.contains(child)
            assert set(child.timesteps) <= set(a.timesteps) | set(b.timesteps)
            assert set(child.key_steps) <= set(a.key_steps) | set(b.key_steps)
    # permutations are one candidate
    assert make_candidate([3, 9, 5]) == make_candidate([9, 5, 3]) == Candidate((9, 5, 3))


def test_select_parents_is_elitist_and_next_generation_avoids_seen():
    fitness = {make_candidate([9, i]): float(abs(i - 4)) for i in range(9)}
    assert select_parents(fitness, 3) == [make_candidate([9, 4]), make_candidate([9, 3]), make_candidate([9, 5])]
    space = SearchSpace(num_steps=2, max_timestep=9)
    children = next_generation(select_parents(fitness, 3), fitness, space, size=20, num_mutations=10,
                               num_crossovers=5, mutation_prob=0.25, generator=torch.Generator().manual_seed(0))
    assert len(set(children)) == len(children) == 20
    assert not set(children) & set(fitness)
    # the space has 45 candidates: once they are all seen, no child can be made
    everything = {make_candidate([i, j]): 0.0 for i in range(10) for j in range(i)}
    assert next_generation(list(everything)[:3], everything, space, 10, 5, 2, 0.25, torch.Generator()) == []


# ------------------------------------------------------------------------------------------------ objectives
def test_exact_objective_converges_with_steps(mixture):
    objective = ExactObjective(mixture, num_samples=2048, seed=1)
    few = objective.score(objective.sample(num_inference_steps=3))
    many = objective.score(objective.sample(num_inference_steps=100))
    exact = objective.score(mixture.sample_data(2048, torch.Generator().manual_seed(2)))
    assert many < 0.1 * few
    assert many == pytest.approx(exact, abs=0.01)  # what remains at 100 steps is sampling noise


# ------------------------------------------------------------------------------------------------ search
@pytest.mark.parametrize("num_steps", [4, 6])
def test_exact_search_beats_uniform_logsnr_and_karras(mixture, num_steps):
    # 80 evaluations and 2048 held-out samples (was 120 / 4096): found / best baseline is 0.58 (4 steps) and 0.46
    # (6 steps) against the 0.8 bound (0.54 / 0.47 before); over search seeds 0-4 the worst is 0.63 (was 0.55).
    config = SearchConfig(seed=0, num_samples=1024, max_evaluations=80, fix_first=True)
    result = search_timesteps(mixture, num_steps, "exact", config)
    assert len(result.timesteps) == num_steps and result.timesteps[0] == 999
    held_out = ExactObjective(mixture, num_samples=2048, seed=1234)  # noise never seen by the search

    def score(**flags):
        return held_out.score(held_out.sample(scheduler=_diffusers_dpmpp(mixture, **flags), **(
            {"timesteps": result.timesteps} if not flags else {"num_inference_steps": num_steps})))

    found = held_out.score(held_out.sample(result.timesteps, scheduler=_diffusers_dpmpp(mixture)))
    uniform = held_out.score(held_out.sample(scheduler=_diffusers_dpmpp(mixture), num_inference_steps=num_steps))
    logsnr, karras = score(use_lu_lambdas=True), score(use_karras_sigmas=True)
    assert found < 0.8 * min(uniform, logsnr, karras), (found, uniform, logsnr, karras)


def test_same_seed_same_result_and_no_candidate_evaluated_twice(mixture):
    calls: list[Candidate] = []
    objective = ExactObjective(mixture, num_samples=256, seed=0)

    def counted(c: Candidate) -> float:
        calls.append(c)
        return objective(c)

    # population 6 and 30 evaluations: still 5 generations of mutants, crossovers and random fill (was 12 / 60)
    config = SearchConfig(seed=3, max_evaluations=30, population_size=6)
    first = search_timesteps(mixture, 4, counted, config)
    assert len(calls) == len(set(calls)) == first.evaluations == 30
    assert all(list(c.timesteps) == sorted(set(c.timesteps), reverse=True) for c in calls)
    second = search_timesteps(mixture, 4, counted, config)
    assert (second.timesteps, second.history, second.candidates) == (first.timesteps, first.history, first.candidates)
    other = search_timesteps(mixture, 4, counted, SearchConfig(seed=4, max_evaluations=30, population_size=6))
    assert other.candidates != first.candidates


def test_checkpoint_resume_replays_without_reevaluating(mixture, tmp_path):
    config = SearchConfig(seed=0, max_evaluations=20, num_samples=128)  # 2 generations (16 + 4): resume crosses one
    full = search_timesteps(mixture, 3, "exact", config)
    ckpt = tmp_path / "search.json"
    search_timesteps(mixture, 3, "exact", config, checkpoint=ckpt)
    record = json.loads(ckpt.read_text())
    record["evaluated"] = record["evaluated"][:10]  # as if interrupted after 10 evaluations
    ckpt.write_text(json.dumps(record))
    resumed = search_timesteps(mixture, 3, "exact", config, checkpoint=ckpt)
    assert resumed.evaluations == 10
    assert (resumed.timesteps, resumed.history) == (full.timesteps, full.history)
    with pytest.raises(ValueError, match="another search"):
        search_timesteps(mixture, 4, "exact", config, checkpoint=ckpt)


def test_result_save_load_in_schedule_format(mixture, tmp_path):
    from fastdiff.schedulers.schedules import load_schedule

    result = search_timesteps(mixture, 3, "exact", SearchConfig(max_evaluations=8, num_samples=64))
    path = result.save(tmp_path / "schedule.json")
    assert load_schedule(path)["timesteps"] == result.timesteps
    assert SearchResult.load(path) == result


def test_clear_errors(mixture):
    with pytest.raises(ValueError, match="num_steps"):
        search_timesteps(mixture, 0, "exact")
    with pytest.raises(ValueError, match="num_steps"):
        search_timesteps(mixture, 1001, "exact")
    with pytest.raises(ValueError, match="max_evaluations"):
        SearchConfig(max_evaluations=0)
    with pytest.raises(ValueError, match="unknown objective"):
        search_timesteps(mixture, 4, "fid")
    with pytest.raises(ValueError, match="GaussianMixtureDenoiser"):
        search_timesteps(object(), 4, "exact")
    reference = compute_stats(torch.randn(16, 8), {"extractor": "inception"})
    with pytest.raises(ValueError, match="extractor 'inception'.*'lenet'"):
        PipelineObjective(None, lambda x: x, reference, extractor="lenet")
    lenet_ref = compute_stats(torch.randn(16, 8), {"extractor": "lenet"})
    objective = PipelineObjective(None, lambda x: x.reshape(len(x), -1), lenet_ref, extractor="lenet")
    with pytest.raises(ValueError, match="dimension 12"):
        objective.score_images(torch.rand(4, 3, 2, 2))


# ------------------------------------------------------------------------------------------------ pipelines
@pytest.fixture(scope="module")
def tiny_pipe():
    from fastdiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixel_objective(pipe, n=2):
    # 32x32 images (16x16 latents) and 4x4 pooled pixels (48 features): the same pipeline, hook and FD code paths
    # as 64x64 images and 768 features, at a quarter of the UNet cost and without 768x768 matrix square roots
    reference = compute_stats(torch.rand(8, 3 * 4 * 4, generator=torch.Generator().manual_seed(0)),
                              {"extractor": "pixels"})

    def pixels(images):
        return torch.nn.functional.avg_pool2d(images, 8).reshape(len(images), -1)

    return PipelineObjective(pipe, pixels, reference, extractor="pixels", num_samples=n,
                             pipe_kwargs={"height": 32, "width": 32}, per_image_kwargs={"prompt": ["a red cube"] * n})


def test_fd_search_on_a_pipeline_and_schedule_works_with_both_schedulers(tiny_pipe):
    from fastdiff.schedulers import DPMSolverPlusPlusScheduler

    result = search_timesteps(tiny_pipe, 2, _pixel_objective(tiny_pipe), SearchConfig(max_evaluations=3, num_parents=2,
                                                                                       population_size=3))
    assert result.evaluations == 3 and result.objective == "fd"
    outputs = []
    for scheduler_cls in (DPMSolverMultistepScheduler, DPMSolverPlusPlusScheduler):
        tiny_pipe.scheduler = scheduler_cls.from_config(tiny_pipe.scheduler.config)
        outputs.append(tiny_pipe("a red cube", timesteps=result.timesteps, height=32, width=32, output_type="pt",
                                 generator=torch.Generator().manual_seed(0)).images)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


def test_joint_search_of_key_steps_applies_as_encoder_propagation(tiny_pipe):
    config = SearchConfig(max_evaluations=2, population_size=2, num_parents=2, num_key_steps=2, stage2_evaluations=2)
    result = search_timesteps(tiny_pipe, 3, _pixel_objective(tiny_pipe), config)
    staged = [c for c in result.candidates if c["key_steps"]]
    assert len(staged) == 2 and all(len(c["key_steps"]) == 2 and c["key_steps"][0] == 0 for c in staged)
    assert result.key_steps is not None and result.key_steps[0] == 0
    assert list(result.encoder_propagation_config().key_steps) == result.key_steps
    # key steps change the images (the propagation hook really ran), and removing it restores them
    objective = _pixel_objective(tiny_pipe, n=1)
    full = objective.generate(make_candidate(result.timesteps))
    propagated = objective.generate(make_candidate(result.timesteps, result.key_steps))
    assert not torch.equal(full, propagated)
    torch.testing.assert_close(objective.generate(make_candidate(result.timesteps)), full, atol=0, rtol=0)


def test_cli_bad_input_exits_2_with_the_fix(tmp_path, capsys):
    from fastdiff.cli import main

    code = main(["search", "--steps", "3", "--objective", "exact", "--skips", "2", "--out", str(tmp_path / "s.json")])
    assert code == 2 and "no layers to skip" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
    assert main(["search", "--steps", "3", "--objective", "exact", "--evaluations", "0"]) == 2
    assert "max_evaluations must be >= 1" in capsys.readouterr().err


def test_cli_writes_schedule(tmp_path):
    from fastdiff.cli import main

    out = tmp_path / "schedule.json"
    code = main(["search", "--steps", "3", "--objective", "exact", "--evaluations", "6", "--population", "4",
                 "--parents", "2", "--num-samples", "64", "--out", str(out), "--checkpoint", str(tmp_path / "c.json")])
    assert code == 0
    result = SearchResult.load(out)
    assert len(result.timesteps) == 3 and result.evaluations == 6


def test_gits_style_baseline_returns_a_valid_schedule_on_the_grid(tiny_pipe):
    from diffusers import DPMSolverMultistepScheduler

    from fastdiff.search.baselines import gits_timesteps

    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))  # 32x32 images
    kwargs = {"prompt": ["a red cube"], "height": 32, "width": 32}
    timesteps = gits_timesteps(tiny_pipe, 3, noise, kwargs, grid_size=6)
    grid = DPMSolverMultistepScheduler.from_config(tiny_pipe.scheduler.config, use_karras_sigmas=True)
    grid.set_timesteps(6)
    assert len(timesteps) == 3 and timesteps == sorted(set(timesteps), reverse=True)
    assert timesteps[0] == int(grid.timesteps[0]) and set(timesteps) <= {int(t) for t in grid.timesteps}
