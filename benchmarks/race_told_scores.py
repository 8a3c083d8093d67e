"""Is what the optimizer is told the reason a long race stalls? The multi-fidelity benchmark's race, with every
stopped trial told to the optimizer as its measured full-sample score instead of its prediction.

The score is computed in the driver on the trial's own search noise and is not counted as samples, so this
is a diagnostic, not a scheduler: if the race stops stalling with exact scores, the low-fidelity predictions
told for stopped trials are the cause, and the samples it then needs bound what any better told score could
give (docs/RESULTS.md, "Over the three training seeds, and at the preset's budget").

    python benchmarks/race_told_scores.py --cm-run RUN --kinds cm --seeds 0 --full-trials 400 --mf-factor 3 \\
        --schedulers race --race-z 1 --plot told.png

Takes `benchmarks/multi_fidelity.py`'s flags and prints its report; the report's per-round overhead includes the
driver's scoring here and means nothing.
"""

from __future__ import annotations

from typing import Any

import multi_fidelity  # benchmarks/ is on sys.path: the script's own folder
from lcsc_ray.scoring import cached_scorer
from lcsc_ray.search.candidates import candidate_index, decode_candidate
from lcsc_ray.search.objective import SearchObjective
from lcsc_ray.search.ray_compat import config_of_result
from lcsc_ray.search.searcher import LcscNevergradSearch
from lcsc_ray.search.trial import FULL_FIDELITY_KEY


def main() -> None:
    setups: list[dict] = []
    told = 0
    setup_run = multi_fidelity.setup_run

    def keep_setup(*args: Any, **kwargs: Any) -> dict:
        setups.append(setup_run(*args, **kwargs))
        return setups[-1]

    tell = LcscNevergradSearch.on_trial_complete

    def tell_full_score(self: LcscNevergradSearch, trial_id: str, result: dict | None = None,
                        error: bool = False) -> None:
        nonlocal told
        if result and not error and self._metric in result and not result.get(FULL_FIDELITY_KEY, True):
            setup = setups[-1]
            config = config_of_result(result)
            alpha = setup["space"].to_coefficients(decode_candidate(config)[0])
            full = cached_scorer(setup["spec"]).score(alpha, seed=SearchObjective().seed_of(candidate_index(config)),
                                                      num_samples=setup["preset"]["fid_samples"])
            result = {**result, self._metric: float(full.score)}
            told += 1
        tell(self, trial_id, result, error)

    multi_fidelity.setup_run = keep_setup
    LcscNevergradSearch.on_trial_complete = tell_full_score
    multi_fidelity.main()
    print(f"stopped trials told their full score: {told}")


if __name__ == "__main__":
    main()
