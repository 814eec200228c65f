"""A search space in hydra-optuna-sweeper's grammar (choice, range, interval, tag(log, ...)),
read into Optuna distributions."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from cnnlab import CnnlabError, one_line


def search_space(
    overrides: Sequence[str], where: str
) -> tuple[dict[str, BaseDistribution], dict[str, str]]:  # fmt: skip
    """({key: distribution} for sweep overrides, {key: value} for plain ones), in the grammar of
    hydra-optuna-sweeper: choice(a, b), range(start, stop[, step]), interval(low, high),
    tag(log, interval(low, high)), shuffle(range(...))."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise CnnlabError(f"{where}: {str(exc).splitlines()[0]}") from None
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            try:
                space[key] = _distribution(override, where)
            except (ValueError, IndexError) as exc:  # Optuna's bounds checks; an empty range
                raise CnnlabError(
                    f"{where}: {override.input_line} is an empty or reversed search space "
                    f"({one_line(exc) if str(exc) else 'no values'}); give interval(low, high) "
                    "and range(start, stop) with low < high"
                ) from None
        else:
            fixed[key] = override.get_value_element_as_str()
    return space, fixed


def _distribution(override: Override, where: str) -> BaseDistribution:
    key, value = override.get_key_element(), override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        assert isinstance(value, (ChoiceSweep, RangeSweep))
        return CategoricalDistribution(list(override.sweep_iterator(Transformer.encode)))
    if isinstance(value, RangeSweep):  # Hydra's range: stop excluded
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(values[0], values[-1], step=float(value.step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if log and value.start <= 0:
            raise CnnlabError(f"{where}: {key}: a log interval needs a low end > 0")
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise CnnlabError(
        f"{where}: {key}={override.get_value_element_as_str()} is not a search space; use "
        "choice(...), range(...), interval(...) or tag(log, interval(...))"
    )
