"""AutoDiffusion (Li et al. 2023, arXiv 2309.10438): the evolutionary search itself, as pure seeded functions.

A candidate is a step schedule: K distinct integer timesteps, stored sorted in descending order (so that
permutations of one set are one candidate, unlike the paper's ADM code), plus, in the joint search, the step
indices that are encoder-propagation key steps, or the (step, layer) pairs whose UNet layer is skipped (the
paper's stage 2). Every random choice draws from an injected
`torch.Generator`, so a search is a deterministic function of its seed and its fitness values.

One generation (paper's `EvolutionSearcher`, shipped defaults P = 50, top 10, m_prob = 0.25):
- parents: the best `num_parents` candidates evaluated so far (elitist pool over all generations);
- children: mutants of random parents (each gene replaced with probability `mutation_prob` by an unused
  value), uniform crossovers of two parents (gene i from either, position-wise on the sorted lists: the
  paper's code compares lists with `<` instead), then random candidates to fill the population;
- deduplication: a child equal to any candidate already evaluated or already in the generation is redrawn,
  so no candidate is ever evaluated twice;
- budget: the total number of evaluations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

MAX_DRAWS = 50  # attempts to draw one new, unseen child before giving up on that slot


@dataclass(frozen=True, order=True)
class Candidate:
    """A step schedule: `timesteps` strictly descending; `key_steps` ascending step indices (() = no propagation);
    `skips` ascending (step index, layer id) pairs of skipped UNet layers (() = the full network)."""

    timesteps: tuple[int, ...]
    key_steps: tuple[int, ...] = ()
    skips: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict:
        record = {"timesteps": list(self.timesteps), "key_steps": list(self.key_steps)}
        if self.skips:
            record["skips"] = [list(pair) for pair in self.skips]
        return record

    @classmethod
    def from_dict(cls, record: Mapping) -> Candidate:
        return make_candidate(record["timesteps"], record.get("key_steps", ()), record.get("skips", ()))


@dataclass(frozen=True)
class SearchSpace:
    """Schedules of `num_steps` distinct timesteps in [min_timestep, max_timestep]; optionally `num_key_steps` keys.

    With `fix_first`, every schedule starts at `max_timestep` (where the initial noise N(0, I) is exact);
    the paper does not fix it, and a moment-matching fitness can then favour starting from a lower timestep.

    With `num_key_steps` set, a candidate also chooses which of its steps are key steps (step 0 always is,
    since the first step must compute the encoder features that later steps reuse).

    With `num_skips` set (the paper's stage 2), a candidate also chooses exactly `num_skips` (step, layer)
    pairs of a UNet with `num_layers` skippable layers, at most `max_skips_per_step` at any one step (the
    paper's per-step bound `max_prun` = 10% of the layers). A fixed count is the paper's budget of kept
    layers over all steps, held with equality so that every candidate costs the same.
    """

    num_steps: int
    max_timestep: int
    min_timestep: int = 0
    num_key_steps: int | None = None
    fix_first: bool = False
    num_skips: int | None = None
    num_layers: int = 0
    max_skips_per_step: int = 1

    def __post_init__(self) -> None:
        size = self.max_timestep - self.min_timestep + 1
        if self.min_timestep < 0 or size < 1:
            raise ValueError(f"need 0 <= min_timestep <= max_timestep, got [{self.min_timestep}, {self.max_timestep}].")
        if not 1 <= self.num_steps <= size:
            raise ValueError(f"num_steps must be in [1, {size}] (the number of timesteps in the space), "
                             f"got {self.num_steps}.")
        if self.num_key_steps is not None and not 1 <= self.num_key_steps <= self.num_steps:
            raise ValueError(f"num_key_steps must be in [1, num_steps={self.num_steps}], got {self.num_key_steps}.")
        if self.num_skips is not None:
            capacity = self.num_steps * min(self.num_layers, self.max_skips_per_step)
            if not 1 <= self.num_skips <= capacity:
                raise ValueError(f"num_skips must be in [1, {capacity}] ({self.num_steps} steps x at most "
                                 f"{min(self.num_layers, self.max_skips_per_step)} of {self.num_layers} layers "
                                 f"per step), got {self.num_skips}.")

    def contains(self, c: Candidate) -> bool:
        ts, ks = c.timesteps, c.key_steps
        ok = (len(ts) == self.num_steps and all(a > b for a, b in zip(ts, ts[1:]))
              and self.min_timestep <= ts[-1] and ts[0] <= self.max_timestep
              and (not self.fix_first or ts[0] == self.max_timestep) and self._skips_ok(c.skips))
        if self.num_key_steps is None:
            return ok and ks == ()
        return (ok and len(ks) == self.num_key_steps and ks[:1] == (0,) and all(a < b for a, b in zip(ks, ks[1:]))
                and ks[-1] < self.num_steps)

    def _skips_ok(self, skips: tuple[tuple[int, int], ...]) -> bool:
        if self.num_skips is None:
            return skips == ()
        per_step: dict[int, int] = {}
        for step, layer in skips:
            if not (0 <= step < self.num_steps and 0 <= layer < self.num_layers):
                return False
            per_step[step] = per_step.get(step, 0) + 1
        return (len(skips) == self.num_skips and all(a < b for a, b in zip(skips, skips[1:]))
                and max(per_step.values(), default=0) <= self.max_skips_per_step)

    def skip_pairs(self) -> list[tuple[int, int]]:
        """Every (step, layer) pair of the space, in order."""
        return [(s, layer) for s in range(self.num_steps) for layer in range(self.num_layers)]


# ------------------------------------------------------------------------------------------------ helpers
def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def _choose(values: list[int], k: int, generator: torch.Generator) -> list[int]:
    """k distinct entries of `values`, uniformly at random."""
    idx = torch.randperm(len(values), generator=generator)[:k]
    return [values[int(i)] for i in idx]


def make_candidate(timesteps: Iterable[int], key_steps: Iterable[int] = (),
                   skips: Iterable[Sequence[int]] = ()) -> Candidate:
    """Canonical form: timesteps sorted descending, key steps and skip pairs ascending (dedup of permutations)."""
    return Candidate(tuple(sorted((int(t) for t in timesteps), reverse=True)), tuple(sorted(int(k) for k in key_steps)),
                     tuple(sorted((int(s), int(layer)) for s, layer in skips)))


def _random_skips(space: SearchSpace, generator: torch.Generator) -> list[tuple[int, int]]:
    """`num_skips` distinct (step, layer) pairs in random order, at most `max_skips_per_step` per step."""
    pairs, per_step, chosen = space.skip_pairs(), {}, []
    for i in torch.randperm(len(pairs), generator=generator).tolist():
        step, layer = pairs[i]
        if per_step.get(step, 0) < space.max_skips_per_step:
            per_step[step] = per_step.get(step, 0) + 1
            chosen.append((step, layer))
            if len(chosen) == space.num_skips:
                break
    return chosen


def random_candidate(space: SearchSpace, generator: torch.Generator, timesteps: Iterable[int] | None = None
                     ) -> Candidate:
    """K timesteps drawn uniformly without replacement (or the given ones) and random key steps (0 always kept)."""
    if timesteps is None:
        top = space.max_timestep + (0 if space.fix_first else 1)
        timesteps = _choose(list(range(space.min_timestep, top)), space.num_steps - space.fix_first, generator)
        timesteps += [space.max_timestep] if space.fix_first else []
    keys: list[int] = []
    if space.num_key_steps is not None:
        keys = [0, *_choose(list(range(1, space.num_steps)), space.num_key_steps - 1, generator)]
    return make_candidate(timesteps, keys, _random_skips(space, generator) if space.num_skips else ())


def mutate(c: Candidate, space: SearchSpace, prob: float, generator: torch.Generator) -> Candidate:
    """Replace each gene with probability `prob` by a value the candidate does not use; at least one gene changes.

    Timestep genes take an unused timestep of the space; key-step genes (all but step 0) move to an unused
    non-key step index; skip genes move to an unused (step, layer) pair (the caller's `space.contains`
    rejects a child that breaks the per-step bound).
    """
    ts, ks, sk = list(c.timesteps), list(c.key_steps), list(c.skips)
    free = {"t": sorted(set(range(space.min_timestep, space.max_timestep + 1)) - set(ts)),
            "k": sorted(set(range(1, space.num_steps)) - set(ks)),
            "s": sorted(set(space.skip_pairs()) - set(sk)) if sk else []}
    targets = {"t": ts, "k": ks, "s": sk}
    genes = [("t", i) for i in range(int(space.fix_first), len(ts))] if free["t"] else []
    genes += [("k", i) for i in range(1, len(ks))] if free["k"] else []
    genes += [("s", i) for i in range(len(sk))] if free["s"] else []
    if not genes:
        return c
    hits = (torch.rand(len(genes), generator=generator) < prob).tolist()
    if not any(hits):
        hits[_randint(len(genes), generator)] = True
    for (kind, i), hit in zip(genes, hits):
        if not hit:
            continue
        pool = free[kind]
        new = pool.pop(_randint(len(pool), generator))
        pool.append(targets[kind][i])
        targets[kind][i] = new
    return make_candidate(ts, ks, sk)


def crossover(a: Candidate, b: Candidate, generator: torch.Generator) -> Candidate | None:
    """Uniform crossover: gene i of the child comes from parent a or b (sorted lists, position-wise).

    Returns None when the child would repeat a timestep, a key step or a skip pair (the caller draws again).
    """
    n, m = len(a.timesteps), len(a.key_steps)
    pick = (torch.rand(n + m + len(a.skips), generator=generator) < 0.5).tolist()
    ts = [x if p else y for x, y, p in zip(a.timesteps, b.timesteps, pick[:n])]
    ks = [x if p else y for x, y, p in zip(a.key_steps, b.key_steps, pick[n:n + m])]
    sk = [x if p else y for x, y, p in zip(a.skips, b.skips, pick[n + m:])]
    if len(set(ts)) < len(ts) or len(set(ks)) < len(ks) or len(set(sk)) < len(sk):
        return None
    return make_candidate(ts, ks, sk)


def select_parents(fitness: Mapping[Candidate, float], num_parents: int) -> list[Candidate]:
    """Elitist selection: the `num_parents` lowest-fitness candidates (ties broken by the candidate, deterministic)."""
    ranked = sorted(fitness.items(), key=lambda item: (item[1], item[0]))
    return [c for c, _ in ranked[:num_parents]]


def initial_population(space: SearchSpace, seeds: Iterable[Candidate], size: int, mutation_prob: float,
                       generator: torch.Generator) -> list[Candidate]:
    """Paper's initialisation: the seed schedules (e.g. uniform), mutations of them, then random candidates.

    Half of the remaining slots are mutants of the seeds, the rest random; all distinct.
    """
    population: list[Candidate] = []
    for c in seeds:
        if space.contains(c) and c not in population:
            population.append(c)
    base = list(population)
    num_mutants = (size - len(population)) // 2 if base else 0
    for _ in range(num_mutants * MAX_DRAWS):
        if len(population) >= len(base) + num_mutants:
            break
        child = mutate(base[_randint(len(base), generator)], space, mutation_prob, generator)
        if child not in population and space.contains(child):
            population.append(child)
    for _ in range(size * MAX_DRAWS):
        if len(population) >= size:
            break
        child = random_candidate(space, generator)
        if child not in population and space.contains(child):
            population.append(child)
    return population[:size]


def next_generation(parents: list[Candidate], seen: Iterable[Candidate], space: SearchSpace, size: int,
                    num_mutations: int, num_crossovers: int, mutation_prob: float, generator: torch.Generator
                    ) -> list[Candidate]:
    """Up to `size` new candidates, none in `seen`: mutants, then crossovers, then random fill."""
    seen = set(seen)
    children: list[Candidate] = []

    def add(make: Callable[[], Candidate | None], count: int) -> None:
        target = min(size, len(children) + count)
        for _ in range(count * MAX_DRAWS):
            if len(children) >= target:
                return
            child = make()
            if child is not None and child not in seen and space.contains(child):
                seen.add(child)
                children.append(child)

    add(lambda: mutate(parents[_randint(len(parents), generator)], space, mutation_prob, generator), num_mutations)
    if len(parents) >= 2:
        def cross() -> Candidate | None:
            i, j = _choose(list(range(len(parents))), 2, generator)
            return crossover(parents[i], parents[j], generator)
        add(cross, num_crossovers)
    add(lambda: random_candidate(space, generator), size - len(children))
    return children


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class EvolutionState:
    """Everything a search has seen, in evaluation order: enough to report it and to resume it."""

    fitness: dict[Candidate, float] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)  # best fitness after each generation
    generations: int = 0


def evolve(evaluate: Callable[[Candidate], float], space: SearchSpace, seeds: Iterable[Candidate], *,
           population_size: int, num_parents: int, num_mutations: int, num_crossovers: int, mutation_prob: float,
           init_mutation_prob: float, max_evaluations: int, max_generations: int | None,
           generator: torch.Generator, state: EvolutionState | None = None,
           on_evaluation: Callable[[Candidate, float, EvolutionState], None] | None = None) -> EvolutionState:
    """Run generations until `max_evaluations` candidates are evaluated (or `max_generations` / no new candidate).

    `evaluate` is called once per new candidate; `state` may carry fitness from an earlier stage (those
    candidates count as seen and as possible parents, but not against this call's budget).
    """
    state = state or EvolutionState()
    used = generations = 0
    population = initial_population(space, seeds, population_size, init_mutation_prob, generator)
    while True:
        for c in population:
            if used >= max_evaluations:
                break
            if c in state.fitness:
                continue
            value = float(evaluate(c))
            state.fitness[c] = value
            used += 1
            if on_evaluation is not None:
                on_evaluation(c, value, state)
        in_space = {c: f for c, f in state.fitness.items() if space.contains(c)}
        state.history.append(min(in_space.values()) if in_space else float("inf"))
        state.generations += 1
        generations += 1
        if used >= max_evaluations or (max_generations is not None and generations >= max_generations):
            return state
        parents = select_parents(in_space, num_parents)
        population = next_generation(parents, state.fitness, space, population_size, num_mutations,
                                     num_crossovers, mutation_prob, generator)
        if not population:
            return state
