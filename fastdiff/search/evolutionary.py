"""AutoDiffusion (Li et al. 2023, arXiv 2309.10438): the evolutionary search itself, as pure seeded functions.

A candidate is a step schedule: K distinct integer timesteps, stored sorted in descending order (so that
permutations of one set are one candidate, unlike the paper's ADM code), plus, in the joint search, the step
indices that are encoder-propagation key steps. Every random choice draws from an injected
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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

MAX_DRAWS = 50  # attempts to draw one new, unseen child before giving up on that slot


@dataclass(frozen=True, order=True)
class Candidate:
    """A step schedule: `timesteps` strictly descending; `key_steps` ascending step indices (() = no propagation)."""

    timesteps: tuple[int, ...]
    key_steps: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"timesteps": list(self.timesteps), "key_steps": list(self.key_steps)}

    @classmethod
    def from_dict(cls, record: Mapping) -> Candidate:
        return cls(tuple(int(t) for t in record["timesteps"]), tuple(int(k) for k in record.get("key_steps", ())))


@dataclass(frozen=True)
class SearchSpace:
    """Schedules of `num_steps` distinct timesteps in [min_timestep, max_timestep]; optionally `num_key_steps` keys.

    With `fix_first`, every schedule starts at `max_timestep` (where the initial noise N(0, I) is exact);
    the paper does not fix it, and a moment-matching fitness can then favour starting from a lower timestep.

    With `num_key_steps` set, a candidate also chooses which of its steps are key steps (step 0 always is,
    since the first step must compute the encoder features that later steps reuse).
    """

    num_steps: int
    max_timestep: int
    min_timestep: int = 0
    num_key_steps: int | None = None
    fix_first: bool = False

    def __post_init__(self) -> None:
        size = self.max_timestep - self.min_timestep + 1
        if self.min_timestep < 0 or size < 1:
            raise ValueError(f"need 0 <= min_timestep <= max_timestep, got [{self.min_timestep}, {self.max_timestep}].")
        if not 1 <= self.num_steps <= size:
            raise ValueError(f"num_steps must be in [1, {size}] (the number of timesteps in the space), "
                             f"got {self.num_steps}.")
        if self.num_key_steps is not None and not 1 <= self.num_key_steps <= self.num_steps:
            raise ValueError(f"num_key_steps must be in [1, num_steps={self.num_steps}], got {self.num_key_steps}.")

    def contains(self, c: Candidate) -> bool:
        ts, ks = c.timesteps, c.key_steps
        ok = (len(ts) == self.num_steps and all(a > b for a, b in zip(ts, ts[1:]))
              and self.min_timestep <= ts[-1] and ts[0] <= self.max_timestep
              and (not self.fix_first or ts[0] == self.max_timestep))
        if self.num_key_steps is None:
            return ok and ks == ()
        return (ok and len(ks) == self.num_key_steps and ks[:1] == (0,) and all(a < b for a, b in zip(ks, ks[1:]))
                and ks[-1] < self.num_steps)


# ------------------------------------------------------------------------------------------------ helpers
def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def _choose(values: list[int], k: int, generator: torch.Generator) -> list[int]:
    """k distinct entries of `values`, uniformly at random."""
    idx = torch.randperm(len(values), generator=generator)[:k]
    return [values[int(i)] for i in idx]


def make_candidate(timesteps: Iterable[int], key_steps: Iterable[int] = ()) -> Candidate:
    """Canonical form: timesteps sorted descending, key steps sorted ascending (dedup of permutations)."""
    return Candidate(tuple(sorted((int(t) for t in timesteps), reverse=True)), tuple(sorted(int(k) for k in key_steps)))


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
    return make_candidate(timesteps, keys)


def mutate(c: Candidate, space: SearchSpace, prob: float, generator: torch.Generator) -> Candidate:
    """Replace each gene with probability `prob` by a value the candidate does not use; at least one gene changes.

    Timestep genes take an unused timestep of the space; key-step genes (all but step 0) move to an unused
    non-key step index.
    """
    ts, ks = list(c.timesteps), list(c.key_steps)
    free_t = sorted(set(range(space.min_timestep, space.max_timestep + 1)) - set(ts))
    free_k = sorted(set(range(1, space.num_steps)) - set(ks))
    genes = [("t", i) for i in range(int(space.fix_first), len(ts))] if free_t else []
    genes += [("k", i) for i in range(1, len(ks))] if free_k else []
    if not genes:
        return c
    hits = (torch.rand(len(genes), generator=generator) < prob).tolist()
    if not any(hits):
        hits[_randint(len(genes), generator)] = True
    for (kind, i), hit in zip(genes, hits):
        if not hit:
            continue
        free = free_t if kind == "t" else free_k
        new = free.pop(_randint(len(free), generator))
        target = ts if kind == "t" else ks
        free.append(target[i])
        target[i] = new
    return make_candidate(ts, ks)


def crossover(a: Candidate, b: Candidate, generator: torch.Generator) -> Candidate | None:
    """Uniform crossover: gene i of the child comes from parent a or b (sorted lists, position-wise).

    Returns None when the child would repeat a timestep or a key step (the caller draws again).
    """
    pick = torch.rand(len(a.timesteps) + len(a.key_steps), generator=generator) < 0.5
    n = len(a.timesteps)
    ts = [x if p else y for x, y, p in zip(a.timesteps, b.timesteps, pick[:n].tolist())]
    ks = [x if p else y for x, y, p in zip(a.key_steps, b.key_steps, pick[n:].tolist())]
    if len(set(ts)) < len(ts) or len(set(ks)) < len(ks):
        return None
    return make_candidate(ts, ks)


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
        if child not in population:
            population.append(child)
    for _ in range(size * MAX_DRAWS):
        if len(population) >= size:
            break
        child = random_candidate(space, generator)
        if child not in population:
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
